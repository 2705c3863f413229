"""
PyTorch reference for the GPU benchmark: GPT-2 124M trained the usual fast
way (torch.compile, bf16 autocast, F.scaled_dot_product_attention with the
causal flag, fused AdamW, TF32 allowed, gradient clipping at 1.0), B=32, T=1024,
random tokens. Prints "RESULT torch_tokens_per_s=..." after warmup (which
includes the compile) and --steps timed steps. Skips with a message when torch
or a GPU is missing.

    python3 dev/bench/torch_gpt2.py [--batch 32] [--seq 1024] [--steps 10]
"""

import argparse
import sys
import time


def build(torch, nn, F, V, maxT, L, NH, C):
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(C, 3 * C)
            self.proj = nn.Linear(C, C)
            self.proj.residual = True

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(x).split(C, dim=2)
            q, k, v = (z.view(b, t, NH, C // NH).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.proj(y.transpose(1, 2).contiguous().view(b, t, C))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln1 = nn.LayerNorm(C)
            self.attn = Attention()
            self.ln2 = nn.LayerNorm(C)
            self.fc = nn.Linear(C, 4 * C)
            self.fcproj = nn.Linear(4 * C, C)
            self.fcproj.residual = True

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.fcproj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(V, C)
            self.wpe = nn.Embedding(maxT, C)
            self.blocks = nn.ModuleList(Block() for _ in range(L))
            self.lnf = nn.LayerNorm(C)
            self.head = nn.Linear(C, V, bias=False)
            self.head.weight = self.wte.weight  # tied
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    std = 0.02 / (2 * L) ** 0.5 if getattr(m, "residual", False) else 0.02
                    nn.init.normal_(m.weight, 0.0, std)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Embedding):
                    nn.init.normal_(m.weight, 0.0, 0.02)

        def forward(self, idx):
            t = idx.shape[1]
            x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.lnf(x))

    return GPT()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    try:
        import torch
        import torch.nn as nn
        import torch.nn.functional as F
    except ImportError:
        print("SKIP: torch is not installed")
        return 0
    if not torch.cuda.is_available():
        print("SKIP: torch sees no GPU")
        return 0
    B, T = args.batch, args.seq
    V, maxT, L, NH, C = 50304, 1024, 12, 12, 768  # GPT-2 124M, vocabulary padded as in llm.c
    torch.manual_seed(1337)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    model = build(torch, nn, F, V, maxT, L, NH, C).cuda()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    cmodel = torch.compile(model)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, 50257, (B, T), device="cuda", generator=g)
    y = torch.randint(0, 50257, (B, T), device="cuda", generator=g)

    def step():
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            logits = cmodel(x)
            loss = F.cross_entropy(logits.view(-1, V), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, GPT-2 124M B={B} T={T}", flush=True)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        loss = step()
        torch.cuda.synchronize()
        print(f"warmup step {i + 1}: loss {loss.item():.4f} ({time.perf_counter() - t0:.1f} s so far)", flush=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tok_s = args.steps * B * T / dt
    print(f"timed {args.steps} steps: {1e3 * dt / args.steps:.1f} ms/step, {tok_s:,.0f} tokens/s, "
          f"loss {loss.item():.4f}")
    print(f"RESULT torch_tokens_per_s={tok_s:.0f} torch_ms_per_step={1e3 * dt / args.steps:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
