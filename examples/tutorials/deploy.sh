# --8<-- [start:setup]
# a champion to deploy (skip with your own): a practice line, one run, promoted; parts to score
python examples/practice_line.py practice/line
defect-train data=folder data.root=practice/line data.category=line
defect-promote
python examples/practice_line.py practice/today --stream 50
# --8<-- [end:setup]
# --8<-- [start:onnx]
# ONNX: written only when it scores like PyTorch (max |delta p_defect| <= 1e-4)
defect-export models:/defect-classifier@champion -o champion.onnx
defect-predict model=champion.onnx images=practice/today
# --8<-- [end:onnx]
# --8<-- [start:openvino]
# OpenVINO IR (.xml + .bin), the same check
defect-export models:/defect-classifier@champion -o champion.xml format=openvino
defect-predict model=champion.xml images=practice/today
# --8<-- [end:openvino]
# --8<-- [start:int8]
# int8, calibrated on the run's validation images; refused when it flips a validation decision
defect-export models:/defect-classifier@champion -o champion-int8.xml format=openvino quantize=int8 \
    || echo "int8 refused: keep fp32 (or --force, after reading why)"
# --8<-- [end:int8]
# --8<-- [start:runtime]
# the registered PyTorch model, scored through ONNX Runtime (exported in memory, parity-checked)
defect-predict images=practice/today runtime=onnx
# --8<-- [end:runtime]
# --8<-- [start:serve]
# serve the champion over HTTP on 127.0.0.1:5001 (this checkout's store; MODEL=, PORT= to change)
make serve
# --8<-- [end:serve]
# --8<-- [start:request]
# from another shell: send the image itself, base64-encoded (a bad row gets an error, not a 500)
curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \
     -d "{\"dataframe_records\": [{\"image_b64\": \"$(base64 -w0 practice/today/00000_good.png)\"}]}"
# --8<-- [end:request]
