# DIP.py at ADP.py's full size on a GPU (python DIP.py presets/dip_gpu.py): the 256×256 image of
# ADP.py's defaults, a wider ConvDecoder and the ES-WMV paper's W = 100, P = 1000 with enough
# iterations for the patience to run out.  device stays "auto" (CUDA when present).
size_x = 256
size_y = 256
width = 128
depth = 7
iterations = 6000
