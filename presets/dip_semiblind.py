# Semi-blind DIP (python DIP.py presets/dip_semiblind.py): the data get an unknown extra Gaussian
# (σ = semiblind_sigma) after the known motion blur b₀; the kernel is learned jointly with the
# generator on the simplex, starting at softmax(log(b₀ + kernel_floor)), with ADP-β's H¹ penalty.
setting = "semiblind"
learn_kernel = True
beta = 1e-3
