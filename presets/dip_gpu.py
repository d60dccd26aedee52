# DIP.py at ADP.py's full size on a GPU (python DIP.py presets/dip_gpu.py): the 256×256 image of
# ADP.py's defaults, a wider UNet (widths 32…512 over 5 scales; 256 is divisible by 2^4) and the
# ES-WMV paper's W = 100, P = 1000 with enough iterations for the patience to run out.  device
# stays "auto" (CUDA when present).  Not run in this session (no GPU was available).
size_x = 256
size_y = 256
width = 32
depth = 5
iterations = 6000
