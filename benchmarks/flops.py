"""FLOPs of a training step, counted from the model's shapes and by torch's FLOP counter, and the
machine's matmul peak: what trainer_throughput.py turns into model FLOPs utilisation (MFU).

Counted from the shapes (`StepCount`): a forward hook on every nn.Linear the step runs (the
frozen base layers, the LoRA A and B layers, the output layer) records its fan-in, fan-out, the
rows it multiplies, whether its input needs a gradient and whether its weight is trained. A
Linear costs 2 x rows x fan-in x fan-out FLOPs forward, the same again for its input's gradient
when the input needs one, and the same again for its weight's gradient when the weight is
trained (a frozen base layer: forward and input gradient; a LoRA layer: all three, except where
its input needs no gradient). Attention (scaled dot-product, per decoder layer) costs
4 x B x H x T^2 x d forward for a [B, T] batch with H query heads of size d; its backward is
counted as torch counts it (10 x B x H x T^2 x d: the scores recomputed, then four products).
Elementwise work (norms, activations, softmax, the optimizer) is not counted, as by torch.
An output layer a trainer applies without calling its nn.Linear (TRL's fused_lm_head, which
computes log-probabilities, entropy and accuracy from the weight in chunks) escapes the hooks:
the shapes' count of such a step is short by it, and torch's is not.

The check (`StepCount.check`): the same step under torch.utils.flop_counter.FlopCounterMode.
torch 2.13 has no formula for the CPU attention kernel (_scaled_dot_product_flash_attention_
for_cpu and its backward: the counter gives them 0); they are added with torch's own formulas
for the GPU kernels, so both counts cover the same operators.

Model FLOPs per real token (`model_flops_per_token`), the MFU numerator, are what the loss
needs, whatever a trainer executes: each Linear of the decoder at every real token (no padding),
the output layer only at positions that predict an answer token, attention per example at its
own length, with a backward of twice the forward (no recomputation: the PaLM paper's convention,
12 x layers x H x d x T per token). The same for every variant, so their MFU compare as their
real tokens/s do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


def matmul_rate(
    m: int, k: int, n: int, dtype: Any, seconds: float = 1.0, repeats: int = 3
) -> float:
    """FLOP/s of an [m, k] x [k, n] matmul in dtype, the best of repeats windows."""
    import torch

    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(repeats):
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            a @ b
            count += 1
        best = max(best, 2 * m * k * n * count / (time.perf_counter() - started))
    return best


def matmul_peak(dtype: Any, size: int = 2048) -> float:
    """The machine's peak for dtype: a dense size x size x size matmul."""
    return matmul_rate(size, size, size, dtype)


@dataclass
class Linear:
    name: str
    fan_in: int
    fan_out: int
    rows: int
    input_grad: bool
    weight_grad: bool
    output_layer: bool

    def per_row(self) -> int:
        return 2 * self.fan_in * self.fan_out * (1 + self.input_grad + self.weight_grad)


@dataclass
class StepCount:
    """One training step of a Hugging Face causal LM, recorded; see the module's docstring."""

    layers: int
    heads: int
    head_dim: int
    linears: list[Linear] = field(default_factory=list)
    batch: tuple[int, int] | None = None  # [B, T] of input_ids
    padding_free: bool = False
    torch_flops: int = 0
    torch_by_operator: dict[str, int] = field(default_factory=dict)
    output_layer: Linear | None = None  # its shape, whether the step calls it or not

    @classmethod
    def for_model(cls, model: Any) -> StepCount:
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, heads, head_dim)

    def record(self, model: Any, step: Any) -> Any:
        """Runs step() (a forward and backward of model) under the hooks and torch's counter."""
        import torch
        from torch.utils import flop_counter

        output = model.get_output_embeddings()
        # The hidden states it takes need a gradient whenever anything before it is trained.
        self.output_layer = Linear(
            "output",
            output.in_features,
            output.out_features,
            0,
            True,
            bool(output.weight.requires_grad),
            True,
        )
        handles = []

        def on_linear(name: str, module: Any) -> Any:
            def hook(mod: Any, args: tuple[Any, ...], _out: Any) -> None:
                x = args[0]
                self.linears.append(
                    Linear(
                        name,
                        mod.in_features,
                        mod.out_features,
                        x.numel() // mod.in_features,
                        bool(x.requires_grad),
                        bool(mod.weight.requires_grad),
                        mod is output,
                    )
                )

            return hook

        def on_model(_mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if self.batch is None:
                ids = kwargs.get("input_ids", args[0] if args else None)
                self.batch = tuple(ids.shape)
                self.padding_free = (
                    "attention_mask" not in kwargs or kwargs["attention_mask"] is None
                )

        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                handles.append(module.register_forward_hook(on_linear(name, module)))
        handles.append(model.register_forward_pre_hook(on_model, with_kwargs=True))
        aten = torch.ops.aten

        def cpu_attention(query: Any, key: Any, value: Any, *_: Any, **__: Any) -> int:
            return flop_counter.sdpa_flop_count(query.shape, key.shape, value.shape)

        def cpu_attention_backward(
            grad: Any, query: Any, key: Any, value: Any, *_: Any, **__: Any
        ) -> int:
            return flop_counter.sdpa_backward_flop_count(
                grad.shape, query.shape, key.shape, value.shape
            )

        cpu_attention._get_raw = True  # type: ignore[attr-defined]  # takes tensors, not shapes
        cpu_attention_backward._get_raw = True  # type: ignore[attr-defined]
        counter = flop_counter.FlopCounterMode(
            display=False,
            custom_mapping={
                aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention,
                aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward,
            },
        )
        try:
            with counter:
                result = step()
        finally:
            for handle in handles:
                handle.remove()
        self.torch_flops = counter.get_total_flops()
        self.torch_by_operator = {
            str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()
        }
        return result

    def counted(self) -> int:
        """The step's FLOPs from the shapes, as executed (padding and recomputation included)."""
        linear = sum(call.rows * call.per_row() for call in self.linears)
        if self.batch is None:
            return linear
        b, t = self.batch
        return linear + self.layers * 14 * b * self.heads * t * t * self.head_dim

    def check(self) -> dict[str, Any]:
        """The shapes' count against torch's, for the step recorded."""
        counted = self.counted()
        return {
            "counted_flops": counted,
            "torch_flops": self.torch_flops,
            "relative_difference": (counted - self.torch_flops) / max(1, self.torch_flops),
            "torch_by_operator": self.torch_by_operator,
            "batch": self.batch,
            "padding_free": self.padding_free,
        }

    def model_flops_per_token(self, lengths: list[tuple[int, int]]) -> float:
        """Model FLOPs per real token over examples given as (tokens, answer positions)."""
        per_token = sum(call.per_row() for call in self._unique() if not call.output_layer)
        assert self.output_layer is not None, "record a step first"
        per_answer = self.output_layer.per_row()
        attention = 12 * self.layers * self.heads * self.head_dim
        tokens = sum(n for n, _ in lengths)
        total = sum(n * per_token + a * per_answer + attention * n * n for n, a in lengths)
        return total / tokens

    def _unique(self) -> list[Linear]:
        """Each Linear once (the step's forward calls each once; a repeat would be a reuse)."""
        seen: dict[str, Linear] = {}
        for call in self.linears:
            seen.setdefault(call.name, call)
        return list(seen.values())


# SmolLM2-135M's matmuls for a batch of 8 x 80 tokens: the decoder's projections, then the
# output layer, then the peak's square.
SHAPES = [
    (640, 576, 1536),
    (640, 1536, 576),
    (640, 576, 576),
    (640, 576, 192),
    (640, 576, 49152),
    (2048, 2048, 2048),
]

if __name__ == "__main__":
    import torch

    print("| m x k x n | float32 GFLOP/s | bfloat16 GFLOP/s |")
    print("|---|---|---|")
    for m, k, n in SHAPES:
        rates = [matmul_rate(m, k, n, dtype) / 1e9 for dtype in (torch.float32, torch.bfloat16)]
        print(f"| {m} x {k} x {n} | {rates[0]:.0f} | {rates[1]:.0f} |")
