"""One forward + backward of SmolLM2-135M on 2 x 128 random tokens: HF vs Megatron (docs/benchmarks.md).

    python benchmarks/fwd_bwd_speed.py hf|megatron
"""
import time, sys, torch
import nemo_dvpo  # noqa: F401  (CPU compatibility layer first)
torch.set_num_threads(2)
from nemo_dvpo.utils.distributed import ParallelConfig, initialize_distributed
from nemo_dvpo.models.config import load_model_config
from nemo_dvpo.models.builder import build_gpt_model
from nemo_dvpo.models.sources import load_hf_model
from nemo_dvpo.models.forward import position_ids_for
from nemo_dvpo.models.logprobs import token_logprobs
cfg = load_model_config("smollm2_135m")
B, S = 2, 128
tokens = torch.randint(0, 49152, (B, S))
if sys.argv[1] == "hf":  # else: Megatron
    m = load_hf_model(cfg.source).train()
    def step():
        out = m(tokens).logits
        lp = torch.log_softmax(out[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None])
        lp.mean().backward()
else:
    initialize_distributed(ParallelConfig(), num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_query_groups, num_layers=cfg.num_layers)
    m = build_gpt_model(cfg, seq_length=512)[0].train()
    def step():
        out = m(tokens, position_ids_for(tokens), attention_mask=None)
        token_logprobs(out, tokens).mean().backward()
step()
t = time.perf_counter()
for _ in range(3): step()
dt = (time.perf_counter() - t) / 3
print(sys.argv[1], f"{dt:.2f}s per fwd+bwd of {B}x{S}: {B*S/dt:.0f} tok/s")
