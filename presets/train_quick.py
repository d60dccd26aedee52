# CI-sized training run (seconds): tiny crops, few filters, small budget.
#   python train.py presets/train_quick.py
train_size = 8
test_size = 4
batch_size = 4
img_size = 32
foe_filters = 4
foe_size = 5
budget = 3000
eval_points = 4
threads = 1
