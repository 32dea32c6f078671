#!/bin/bash
# The GPU acceptance run on a lent device: carried wheels (the device's image lacks megatron-core, megatron-bridge,
# transformers < 5 and lm-eval's IFEval stack), SmolLM2's tokenizer files, then benchmarks/gpu_acceptance.py.
set -u
export PYTHONUNBUFFERED=1 MEGATRON_SUPPRESS_FUSION_WARNINGS=1
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; python3 --version
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devkit/whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/tok && tar xzf .devkit/smollm2_tokenizer.tgz -C /tmp/tok || exit 4
echo "install: $(( $(date +%s) - t0 )) s"
python3 -c "import torch, transformers, megatron.core, nemo_dvpo.models.builder as b; print('torch', torch.__version__, torch.version.cuda, 'transformers', transformers.__version__, 'mcore', megatron.core.__version__, 'te', b.use_transformer_engine(), 'unsupported fusions', b.unsupported_fusions(te_spec=False))"
python3 -m pip list 2>/dev/null | grep -iE "^(torch|numpy|pyarrow|pandas|transformer.engine|apex|flash) " 
python3 benchmarks/gpu_acceptance.py --logits-weights random --tokenizer /tmp/tok/smollm2_tokenizer --deadline-s "${DEADLINE_S:-520}" --sections "${SECTIONS:-logits,checkpoint,training,generation,fit}" --fit-modes "${FIT_MODES:-full,lora}" --out-dir runs/gpu_acceptance
rc=$?
cp runs/gpu_acceptance/gpu_acceptance.json runs/gpu_acceptance/gpu_acceptance.md "$OUT"/ 2>/dev/null
tar czf "$OUT"/logs.tgz runs/gpu_acceptance/logs 2>/dev/null
nvidia-smi --query-gpu=memory.used --format=csv
date -u; echo "acceptance exit code $rc"
exit $rc
