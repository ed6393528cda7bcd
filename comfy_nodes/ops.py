"""The `operations` class ComfyUI builds its own Flux with: a Linear that holds packed weights.

ComfyUI constructs every linear layer as `operations.Linear(in, out, bias,
dtype, device)` before it knows the layer's name, so `PackedLinear` allocates
nothing at construction (a 12B model would otherwise reserve 24 GB) and takes
its form from the tensors `load_state_dict` hands it:

- `<layer>.qweight` (+ `scale`, `zero`, optional `lora_down`/`lora_up`): a
  packed layer in the canonical layout of docs/FORMAT.md, run by bitkernel;
- `<layer>.weight`: a 16-bit layer that behaves exactly like ComfyUI's own
  Linear (embedders, final layer, layers the converter kept in bf16).

Contract with ComfyUI's memory manager and LoRA machinery:

- `state_dict()` holds the packed tensors, so ComfyUI sizes the model by its
  true packed bytes; it also holds a zero-byte `<layer>.weight` entry, because
  ComfyUI maps LoRA keys and accepts patches only for keys in the state dict.
  The `weight` attribute itself stays None, which keeps the ModelPatcher from
  baking patches into it on a full load (it patches Parameters only) and makes
  the Dynamic VRAM patcher skip it.
- Patches arrive at run time: on the low-VRAM path in `weight_function` /
  `weight_lowvram_function` (ComfyUI's LowVramPatch, read here instead of
  called), on the full-load path through `resident` (set by the loader's
  ON_LOAD callback). See lowrank.py for the math.
- Offloaded layers (`comfy_cast_weights`) stay where ComfyUI put them; each
  call moves what it needs to the input's device.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .fileformat import BitfluxFormatError, LayerSpec
from .lowrank import PatchSet, patchset_of

# The zero-byte stand-in for a packed layer's `weight` in state_dict(): LoRA key mapping needs the key only.
WEIGHT_PLACEHOLDER = torch.empty(0)

_KERNEL_DTYPES_CUDA = (torch.float16, torch.bfloat16)


def _on(t: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    if t is None or t.device == device:
        return t
    # non_blocking only towards a GPU: a copy to the CPU must be complete before it is read
    return t.to(device, non_blocking=device.type == "cuda")


class PackedLinearMixin:
    """Mixed into the chosen ComfyUI ops' Linear (see make_operations)."""

    layer_specs: Mapping[str, LayerSpec] = {}
    compute_dtype: Optional[torch.dtype] = None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate the dense weight
        self.in_features, self.out_features = in_features, out_features
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)
        self.expects_bias = bias
        self.storage_dtype = dtype
        self.spec: Optional[LayerSpec] = None  # set when the layer is packed
        self.layer_name = ""
        self.resident: Optional[PatchSet] = None  # patches of a fully loaded layer (loader's ON_LOAD callback)

    # ------------------------------------------------------------------ loading

    @property
    def is_packed(self) -> bool:
        return self.spec is not None

    @property
    def is_loaded(self) -> bool:
        return self.spec is not None or self.weight is not None

    def _bias_dtype(self, stored: torch.dtype) -> torch.dtype:
        # ComfyUI's convention: biases are stored like the weights (storage dtype) and cast per call;
        # fp8 storage (--fp8_e4m3fn-unet) would round a bias for nothing, so those keep a float type.
        for dt in (self.storage_dtype, self.compute_dtype):
            if dt in (torch.float16, torch.bfloat16, torch.float32):
                return dt
        return stored

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        name = prefix[:-1]
        self.layer_name = name
        if prefix + "qweight" in state_dict:
            self._load_packed(name, prefix, state_dict)
        elif prefix + "weight" in state_dict:
            weight = state_dict[prefix + "weight"]
            if tuple(weight.shape) != (self.out_features, self.in_features):
                raise BitfluxFormatError(
                    f"{name}.weight has shape {tuple(weight.shape)}, the architecture needs "
                    f"{(self.out_features, self.in_features)}; the file does not match its metadata."
                )
            self.weight = nn.Parameter(weight.to(self.storage_dtype or weight.dtype), requires_grad=False)
        else:
            missing_keys.append(prefix + "weight")
        bias = state_dict.get(prefix + "bias")
        if bias is not None:
            self.bias = nn.Parameter(bias.to(self._bias_dtype(bias.dtype)), requires_grad=False)
        elif self.expects_bias:
            missing_keys.append(prefix + "bias")

    def _load_packed(self, name: str, prefix: str, sd: Mapping[str, torch.Tensor]) -> None:
        from bitkernel.formats import QuantizedWeight

        spec = self.layer_specs.get(name)
        if spec is None or not spec.quantized:
            raise BitfluxFormatError(
                f"{name} is stored packed, but the file's `layers` metadata has "
                f"{'no entry' if spec is None else repr(spec.format)} for it; the file is damaged."
            )
        qweight, scale, zero = sd[prefix + "qweight"], sd.get(prefix + "scale"), sd.get(prefix + "zero")
        if scale is None or (not spec.symmetric and zero is None):
            raise BitfluxFormatError(f"{name} lacks its scale{'' if spec.symmetric else ' or zero'} tensor.")
        qw = QuantizedWeight(spec.format, qweight, scale, zero, self.in_features, spec.group_size)
        try:
            qw.validate()
        except ValueError as exc:
            raise BitfluxFormatError(f"{name} ({spec.label}, {self.out_features}x{self.in_features}): {exc}") from None
        if qw.out_features != self.out_features:
            raise BitfluxFormatError(
                f"{name} has {qw.out_features} output rows, the architecture needs {self.out_features}."
            )
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        down, up = sd.get(prefix + "lora_down"), sd.get(prefix + "lora_up")
        if (down is None) != (up is None) or (spec.lora_rank and down is None):
            raise BitfluxFormatError(f"{name}: the metadata says lora_rank {spec.lora_rank}, the tensors disagree.")
        if down is not None:
            rank = down.shape[0]
            if tuple(down.shape) != (rank, self.in_features) or tuple(up.shape) != (self.out_features, rank):
                raise BitfluxFormatError(
                    f"{name}: low-rank branch shapes {tuple(down.shape)}, {tuple(up.shape)} "
                    f"do not fit {self.out_features}x{self.in_features}."
                )
        self.register_buffer("lora_down", down)
        self.register_buffer("lora_up", up)
        self.spec = spec

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.spec is not None:
            destination[prefix + "weight"] = WEIGHT_PLACEHOLDER

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() must not round the float32 scales: only their device follows.
        scale = self._buffers.get("scale")
        out = super()._apply(fn, recurse)
        if scale is not None:
            self._buffers["scale"] = scale.to(self._buffers["qweight"].device)
        return out

    # ------------------------------------------------------------------ running

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.spec is None:
            if self.weight is None:
                raise RuntimeError(f"bitflux: layer {self.layer_name or '?'} was never loaded from the model file")
            return super().forward(x, *args, **kwargs)
        return self.forward_packed(x)

    def lowvram_patch(self) -> Optional[Callable]:
        """ComfyUI's per-call patch function for this layer's weight, when it set one."""
        fn = getattr(self, "weight_lowvram_function", None)  # Dynamic VRAM (2026)
        if fn is not None:
            return fn
        for f in self.weight_function:
            if patchset_of(f, self.out_features, self.in_features) is not None:
                return f
        return None

    def _bias_for(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.bias is None:
            return None
        fns = list(self.bias_function)
        lowvram = getattr(self, "bias_lowvram_function", None)
        if lowvram is not None:
            fns.insert(0, lowvram)
        if not fns and self.bias.device == x.device and self.bias.dtype == x.dtype:
            return self.bias  # without the host time of a no-op `to` (a step makes ~500 of these calls)
        # Patch functions add in place: they must get a copy, never the parameter itself.
        bias = self.bias.to(device=x.device, dtype=x.dtype, copy=bool(fns))
        for f in fns:
            bias = f(bias)
        return bias

    def forward_packed(self, x: torch.Tensor) -> torch.Tensor:
        import bitkernel.functional as bkf
        from bitkernel.formats import QuantizedWeight

        dev = x.device
        spec = self.spec
        qw = QuantizedWeight(
            spec.format,
            _on(self.qweight, dev),
            _on(self.scale, dev),
            _on(self.zero, dev),
            self.in_features,
            spec.group_size,
        )
        bias = self._bias_for(x)

        wrappers: list[Callable] = []
        patchset: Optional[PatchSet] = None
        lowvram = getattr(self, "weight_lowvram_function", None)
        fns = ([lowvram] if lowvram is not None else []) + list(self.weight_function)
        for f in fns:
            ps = patchset_of(f, self.out_features, self.in_features)
            if ps is not None:
                patchset = ps
            else:
                wrappers.append(f)
        if fns and patchset is not None:
            self.resident = None  # the layer went to the low-VRAM path; its patches now come from ComfyUI
        elif patchset is None:
            patchset = self.resident

        # bitkernel moves the branch to x's device and dtype itself (linear, add_lowrank): moved here too it
        # would be copied twice.
        own = None if self.lora_down is None else (self.lora_down, self.lora_up)
        if wrappers or (patchset is not None and patchset.lowrank is None):
            # Patches that are not a side branch: ComfyUI's math on a dequantized float32 copy, for this call
            # only (never stored). int8 activations (a8) do not apply on this path.
            weight = bkf.dequantize(qw, torch.float32)
            if patchset is not None:
                weight = patchset.dense(weight)
            for f in wrappers:
                weight = f(weight)
            y = F.linear(x, weight.to(x.dtype), bias)
            if own is not None:
                y = bkf.add_lowrank(y, x, *own)
        else:
            xk = x
            if dev.type == "cuda" and x.dtype not in _KERNEL_DTYPES_CUDA:
                xk = x.to(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
            bk = bias.to(xk.dtype) if bias is not None and bias.dtype != xk.dtype else bias
            y = bkf.linear(xk, qw, bk, spec.act == "a8", own)
            if xk is not x:
                y = y.to(x.dtype)
            if patchset is not None and patchset.lowrank.rank:
                y = bkf.add_lowrank(y, x, patchset.lowrank.down, patchset.lowrank.up)
        return y

    def extra_repr(self) -> str:
        kind = self.spec.label if self.spec is not None else ("dense" if self.weight is not None else "empty")
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


def make_operations(base: type, layer_specs: Mapping[str, LayerSpec], compute_dtype: Optional[torch.dtype]) -> type:
    """A ComfyUI ops class: `base` (e.g. comfy.ops.disable_weight_init) with the packed Linear."""

    class Linear(PackedLinearMixin, base.Linear):
        pass

    Linear.layer_specs = dict(layer_specs)
    Linear.compute_dtype = compute_dtype

    class BitfluxOps(base):
        pass

    BitfluxOps.Linear = Linear
    return BitfluxOps


def packed_layers(module: nn.Module) -> list[tuple[str, PackedLinearMixin]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, PackedLinearMixin)]
