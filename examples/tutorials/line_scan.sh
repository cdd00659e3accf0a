# --8<-- [start:practice]
# a practice line scan: 64 x 1024 px grey strips, defects half the usual size
python examples/practice_line.py practice/scan --width 1024 --size 64 --grey --defect-scale 0.5
defect-data data=folder data.root=practice/scan data.category=scan
# --8<-- [end:practice]
# --8<-- [start:train]
# square: each strip squashed to 224 x 224 (its length 4.6x, small defects with it)
defect-train data=folder data.root=practice/scan data.category=scan experiment_name=scan
# tiles: the strip at native resolution cut into 64 x 256 tiles that overlap by 32 px
defect-train data=folder data.root=practice/scan data.category=scan experiment_name=scan \
    input=tiles "input.tile_size=[64,256]" input.overlap=32
defect-compare experiment_name=scan sweep=null
# --8<-- [end:train]
# --8<-- [start:auto]
# or let the rules decide: an elongated line puts tiles first
defect-train experiment=auto data=folder data.root=practice/scan data.category=scan experiment_name=scan
# --8<-- [end:auto]
# --8<-- [start:aitex]
# AITEX fabric (4096 x 256 line scans): half resolution, 128 x 512 tiles, 64 px overlap
defect-train data=folder data.root=/data/aitex_fabric data.category=aitex \
    input=tiles input.scale=0.5 "input.tile_size=[128,512]" input.overlap=64
# --8<-- [end:aitex]
