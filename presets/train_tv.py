# Learn a smoothed TV (per-channel weight and smoothing) instead of Fields of Experts.
#   python train.py presets/train_tv.py
regulariser = "tv"
tv_weight = 0.02
tv_smoothing = 0.05
step0 = 100.0
