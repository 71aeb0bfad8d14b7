#!/usr/bin/env python3
"""PyTorch baselines for the GPU check: a random-init model of the given Llama
shape (built from a LlamaConfig: nothing is downloaded), decode tokens/s with
transformers `generate` in fp16 fully on the GPU, and with Accelerate's CPU
offload (every decoder layer on the CPU, streamed to the GPU each forward;
embedding, final norm and head on the GPU: the same placement as zeroshard's
`--max-live-bytes 0`).

    python3 torch_bench.py --out torch.json [--hidden 2048 --layers 22 ...]

Decode tokens/s = batch * (new - 1) / (time of generate(new) - time of
generate(1)), greedy, EOS ignored. Writes one JSON object, rewritten after
each part (so a run stopped early leaves what it measured; "done" is true at
the end), with the seconds each part took; a part that cannot run (no
accelerate) is recorded with its error instead. Without an importable torch or
a CUDA device it writes {"skipped": reason} and exits 0.
"""
import argparse
import json
import os
import time
import traceback


def save(path, result):
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)


def timed_generate(model, ids, new_tokens):
    import torch

    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + new_tokens, out.shape
    return time.perf_counter() - t


def decode_tps(model, batch, prompt_len, new_tokens, vocab):
    import torch

    g = torch.Generator(device="cpu").manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, prompt_len), generator=g).to("cuda")
    timed_generate(model, ids, 2)  # warm-up
    prefill = min(timed_generate(model, ids, 1) for _ in range(2))
    total = timed_generate(model, ids, new_tokens)
    return batch * (new_tokens - 1) / max(total - prefill, 1e-9)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--offload-new-tokens", type=int, default=8)
    a = p.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    result = {"shape": vars(a), "gpu": {}, "offload": {}, "seconds": {}, "done": False}
    t = time.perf_counter()

    def lap(name):
        nonlocal t
        now = time.perf_counter()
        result["seconds"][name] = round(now - t, 2)
        t = now
        save(a.out, result)

    try:
        import torch
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as e:
        save(a.out, {"skipped": f"torch or transformers not importable: {e}"})
        return
    if not torch.cuda.is_available():
        save(a.out, {"skipped": f"PyTorch {torch.__version__} sees no CUDA device"})
        return

    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    result["device"] = torch.cuda.get_device_name(0)
    lap("import")
    config = LlamaConfig(
        hidden_size=a.hidden,
        intermediate_size=a.ffn,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        vocab_size=a.vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    model.eval()
    torch.set_default_dtype(torch.float32)
    result["params"] = sum(p.numel() for p in model.parameters())
    lap("init")
    try:
        for b in batches:
            result["gpu"][str(b)] = decode_tps(model, b, a.prompt_len, a.new_tokens, a.vocab)
            save(a.out, result)
    except Exception as e:  # noqa: BLE001 - recorded in the report
        result["gpu"]["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    lap("gpu")

    try:
        from accelerate import dispatch_model

        model.model.layers.to("cpu")  # the host copy Accelerate streams from
        torch.cuda.empty_cache()
        device_map = {"lm_head": 0}
        for name, _ in model.model.named_children():  # embed_tokens, layers, norm, rotary_emb, ...
            if name != "layers":
                device_map[f"model.{name}"] = 0
        device_map.update({f"model.layers.{i}": "cpu" for i in range(a.layers)})
        model = dispatch_model(model, device_map=device_map, main_device=0)
        result["offload"]["device_map"] = "embedding, norm, head on cuda:0; every decoder layer offloaded to cpu"
        for b in batches:
            result["offload"][str(b)] = decode_tps(model, b, a.prompt_len, a.offload_new_tokens, a.vocab)
            save(a.out, result)
    except Exception as e:  # noqa: BLE001
        result["offload"]["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    result["done"] = True
    lap("offload")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
