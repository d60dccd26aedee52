# The target setting (SPEC §6 at 96×96 grey): FoE 10×7×7, σ = 25/255, 64 training and 16 test
# crops, budget 2·10⁵ computations (lower + CG iterations), 16 test evaluations (25 % steps).
# About 4× the default run's work (tens of minutes on one core).
#   python train.py presets/train_full.py [--method=maid]
#   python experiments/isgd_vs_maid.py --budget=200000 --eval_points=16 --threads=1
budget = 200000
eval_points = 16
threads = 1
