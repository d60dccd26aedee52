# Semi-blind deblurring: learn the FoE and the blur kernel (started at a narrower Gaussian).
#   python train.py presets/train_semiblind.py
problem = "semiblind"
noise_level = 0.01
mu0 = 1e-2
