"""Writes a Llama checkpoint folder (config.json + model.safetensors, f16) as a GGUF f16
file for llama.cpp, with the gguf-py of the llama.cpp source being benchmarked.

    python to_gguf.py LLAMA_CPP_SRC MODEL_DIR OUT.gguf

Matrices stay f16 and norms become f32, as llama.cpp's own converter writes an f16
model; q/k rows are permuted to llama.cpp's rotary layout, so the file computes the
same function as the checkpoint. The vocabulary is synthetic (`<t0>`, `<t1>`, ...):
benchmarks feed token ids, never text.
"""
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

src, model_dir, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
sys.path.insert(0, str(src / "gguf-py"))
import gguf  # noqa: E402  (from the llama.cpp source given)

cfg = json.loads((model_dir / "config.json").read_text())
if cfg.get("architectures") != ["LlamaForCausalLM"]:
    sys.exit(f"to_gguf.py: {model_dir}: only LlamaForCausalLM checkpoints, found {cfg.get('architectures')}")
tensors = load_file(str(model_dir / "model.safetensors"))
heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
vocab = cfg["vocab_size"]


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half rows → llama.cpp's interleaved pairs (as convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


w = gguf.GGUFWriter(str(out), "llama")
w.add_name(model_dir.name)
w.add_context_length(cfg.get("max_position_embeddings", 2048))
w.add_embedding_length(cfg["hidden_size"])
w.add_block_count(cfg["num_hidden_layers"])
w.add_feed_forward_length(cfg["intermediate_size"])
w.add_rope_dimension_count(head_dim)
w.add_head_count(heads)
w.add_head_count_kv(kv_heads)
w.add_key_length(head_dim)
w.add_value_length(head_dim)
w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-5))
w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
w.add_vocab_size(vocab)
w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
w.add_tokenizer_model("llama")
w.add_token_list([f"<t{i}>" for i in range(vocab)])
w.add_token_scores([0.0] * vocab)
w.add_token_types([gguf.TokenType.CONTROL if i < 3 else gguf.TokenType.NORMAL for i in range(vocab)])
w.add_bos_token_id(cfg.get("bos_token_id", 1))
w.add_eos_token_id(cfg.get("eos_token_id", 2))

names = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
per_layer = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
for name, t in tensors.items():
    if name in names:
        gname = names[name]
    else:
        parts = name.split(".")
        if parts[:2] != ["model", "layers"] or ".".join(parts[3:]) not in per_layer:
            sys.exit(f"to_gguf.py: unexpected tensor {name}")
        gname = f"blk.{parts[2]}.{per_layer['.'.join(parts[3:])]}"
        if name.endswith("q_proj.weight"):
            t = permute(t, heads)
        elif name.endswith("k_proj.weight"):
            t = permute(t, kv_heads)
    w.add_tensor(gname, t.astype(np.float32) if t.ndim == 1 else t.astype(np.float16))

w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)
