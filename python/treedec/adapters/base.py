"""ModelAdapter: the one interface through which the decode loop and the drafters use a model.

Drafters may call only what is here: embed tokens, run the decoder layers (all of them, a subset,
from a layer on, or per batch row), the final norm, the LM head's top-k or logits, and new KV
rows (a TreeCache). A model family supplies the layout (where its layers, embedding and norm live,
how a layer is called); everything that does not depend on the layout lives in this base class.
"""

from __future__ import annotations

import contextlib

import torch

from .. import host, ops, parallel, reference
from ..attention import TreeStep
from ..cache import TreeCache


class ModelAdapter:
    """A patched model as the loop sees it. Subclasses (one per family) implement the layout
    methods marked below; `adapter_for(model)` picks the family's adapter."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        # a multimodal model (Gemma 3's ForConditionalGeneration) keeps the decoder's settings in
        # its text config; a text model's text config is its config
        self.config = config = text_config(model.config)
        self.num_layers: int = config.num_hidden_layers
        self.num_kv_heads: int = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim: int = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.hidden_size: int = config.hidden_size
        self.vocab_size: int = config.vocab_size
        # tensor parallel: measured times are agreed on across the ranks (parallel.py)
        self.agreement = parallel.Agreement.for_model(model)
        self.refresh()

    # -- the layout: one implementation per model family --------------------------------------
    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        """The decoder layers, in order."""
        raise NotImplementedError

    @property
    def stack(self) -> torch.nn.Module:
        """The module whose forward `forward` calls (the base model): its hooks run there, not in
        `run_layers`, which calls the layers one by one."""
        raise NotImplementedError

    @property
    def bypassed(self) -> list[torch.nn.Module]:
        """Modules around the stack whose forward the loop never calls (the *ForCausalLM itself,
        a multimodal model's wrapper around its language model): hooks on them would not run."""
        return [self.model]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens int64 [...] (no -1) -> embeddings [..., H] on the model's input device."""
        raise NotImplementedError

    def norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm: the residual stream after the last layer -> the LM head's input."""
        raise NotImplementedError

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: TreeCache, step: TreeStep,
                layers: torch.nn.ModuleList | None = None) -> torch.Tensor:
        """tokens int64 [B, T] (no -1), positions int64 [B, T] -> the normed last hidden state [B, T, H],
        writing every layer's KV for the step into `cache`. `layers` (a subset, see `layer_subset`)
        runs only those, each keeping its own layer index (so its own cache layer)."""
        raise NotImplementedError

    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor, cache: TreeCache, step: TreeStep,
                   active: torch.Tensor) -> torch.Tensor:
        """Layer l over the batch rows where active[l] (bool [L, B]) is true, from the residual
        stream `hidden` [B, T, H]; returns the residual stream after the last layer (no norm)."""
        raise NotImplementedError

    def hidden_states(self, tokens: torch.Tensor, layers: torch.nn.ModuleList | None = None) -> torch.Tensor:
        """tokens int64 [1, W] through the model without any cache (`layers`: a subset) -> the normed
        last hidden state [1, W, H]: a plain causal forward, as layer-skip's search scores with."""
        raise NotImplementedError

    def supports_row_subsets(self) -> bool:
        """Whether `run_layers` (layers on part of the batch) works for this model."""
        return False

    def layer_devices(self) -> list[torch.device]:
        """Each layer's device, where its KV rows live (a device_map may split the layers)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def captured(self, layer_indices: tuple[int, ...]):
        """Within the block, every forward keeps the residual stream after each decoder layer in
        `layer_indices`: yields a dict that each such layer's output [B, T, H] fills, by index (a
        feature drafter, EAGLE-3, reads the target's low, middle and high layers there)."""
        outputs: dict[int, torch.Tensor] = {}
        if not layer_indices:
            yield outputs
            return
        layers = self.decoder_layers
        if any(not 0 <= i < len(layers) for i in layer_indices):
            raise ValueError(f"layers {tuple(layer_indices)} are not all among the model's {len(layers)} decoder layers")

        def keeper(index):
            def keep(module, args, output):
                outputs[index] = output[0] if isinstance(output, tuple) else output
            return keep

        handles = [layers[i].register_forward_hook(keeper(i)) for i in layer_indices]
        try:
            yield outputs
        finally:
            for handle in handles:
                handle.remove()

    def agreed_seconds(self, seconds: float) -> float:
        """A measured time that decides anything (a tree's size, a search's budget), as every rank
        sharing the model records it: the slowest rank's under tensor parallelism."""
        return self.agreement.seconds(seconds)

    # -- built on the layout ------------------------------------------------------------------
    def forward_rows(self, tokens: torch.Tensor, positions: torch.Tensor, cache: TreeCache, step: TreeStep,
                     active: torch.Tensor, normed: bool = True) -> torch.Tensor:
        """Like `forward`, but layer l runs only on the batch rows where active[l] (bool [L, B]):
        layer-skip batching, for rows with different skip sets or exit layers. The other rows keep
        their hidden state, as if the layer were skipped. Returns the normed last hidden state
        [B, T, H] (`normed=False`: the residual stream before the final norm)."""
        self._check_row_subsets()
        batch = tokens.shape[0]
        if tuple(active.shape) != (self.num_layers, batch):
            raise ValueError(f"active has shape {tuple(active.shape)}; expected ({self.num_layers}, {batch})")
        hidden = self.run_layers(self.embed(tokens).contiguous(), positions, cache, step, active)
        return self.norm(hidden) if normed else hidden

    def forward_from(self, residual: torch.Tensor, positions: torch.Tensor, cache: TreeCache, step: TreeStep,
                     start: int) -> torch.Tensor:
        """The decoder layers start..L-1 over `residual` [B, T, H] (the residual stream entering layer
        `start`), then the final norm: a step whose first `start` layers already ran (their KV is in
        the cache's step rows) runs only the rest. Returns the normed last hidden state."""
        self._check_row_subsets()
        if not 0 <= start < self.num_layers:
            raise ValueError(f"start = {start} must be a layer index 0..{self.num_layers - 1}")
        active = torch.zeros(self.num_layers, residual.shape[0], dtype=torch.bool)
        active[start:] = True
        return self.norm(self.run_layers(residual.contiguous(), positions, cache, step, active))

    def _check_row_subsets(self) -> None:
        if not self.supports_row_subsets():
            raise ValueError(f"{type(self).__name__} cannot run layers on part of a batch for this model")

    def layer_subset(self, kept: tuple[int, ...]) -> torch.nn.ModuleList:
        """The decoder layers at indices `kept` (ascending), as `forward(layers=...)` takes them."""
        layers = self.decoder_layers
        return torch.nn.ModuleList([layers[i] for i in kept])

    def layer_parameter_count(self) -> int:
        """Parameters of one decoder layer (the layers are alike): what a skipped layer saves."""
        return sum(p.numel() for p in self.decoder_layers[0].parameters())

    def new_cache(self, padding: torch.Tensor, max_len: int, initial_len: int | None = None) -> TreeCache:
        """Empty KV rows for this model: one row per sequence, `padding` int64 [B] left-pad rows
        each (never read), `initial_len` rows (None: all) growing up to `max_len` as steps need
        them, each layer's buffers on its device."""
        dtype = next(self.decoder_layers.parameters()).dtype
        cache = TreeCache(self.num_layers, padding.shape[0], self.num_kv_heads, self.head_dim, max_len=max_len,
                          dtype=dtype, devices=self.layer_devices(), initial_len=initial_len)
        cache.kv_start = padding.to(torch.int32)
        return cache

    # -- the LM head --------------------------------------------------------------------------
    # whether `scale_logits` changes anything (a family adapter sets it)
    transforms_logits: bool = False

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the family's *ForCausalLM does to the LM head's output before returning it (Gemma
        2's soft-cap, Granite's divisor); nothing by default. It must keep the logits' order: the
        fused top-k picks ids before it runs (`topk_values` handles the ties it may make)."""
        return logits

    def refresh(self) -> None:
        """Read the LM head again (each generate call does): it may have been replaced, hooked or
        wrapped since `patch`. Only a plain bias-free nn.Linear that nothing hooks runs through the
        fused top-k kernel; any other head runs as the module it is (its hooks, bias, LoRA or own
        forward included), full logits, then top-k."""
        self.lm_head = self.model.get_output_embeddings()
        self.fused_lm_head = plain_linear(self.lm_head)

    @property
    def lm_head_weight(self) -> torch.Tensor | None:
        """The LM head's [V, H] weight where it has one (draft heads read it to draft); None for a
        head sharded across ranks (tensor parallel), whose rows this rank does not all hold."""
        weight = getattr(self.lm_head, "weight", None)
        whole = (isinstance(weight, torch.Tensor) and weight.dim() == 2 and not parallel.is_distributed(weight)
                 and weight.device.type != "meta")  # offloaded: loaded only inside the head's forward
        return weight if whole else None

    @property
    def lm_head_device(self) -> torch.device:
        """Where the LM head computes (execution_device: its weights' device, or where accelerate's
        hook loads offloaded ones)."""
        return execution_device(self.lm_head)

    def topk(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        """hidden [B, T, H] -> the LM head's top-k ids int64 [B, T, k] on the CPU (k=1: greedy's
        argmax), read with one wait for the device (host.to_host), the tie flag with them."""
        values, ids, tie = self.fused_topk(hidden, k)
        if tie is None:
            return host.to_host(ids)[0]
        ids, tie = host.to_host(ids, tie)
        return host.to_host(self._full_topk(hidden, k)[1])[0] if bool(tie) else ids

    def topk_values(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [B, T, H] -> fp32 logits [B, T, k] (descending) and their ids int64 [B, T, k]."""
        values, ids, tie = self.fused_topk(hidden, k)
        return self._full_topk(hidden, k) if tie is not None and bool(tie) else (values, ids)

    def _full_topk(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k from the LM head module's full logits (no fused kernel, or a tie it made)."""
        return reference.topk_of_logits(self.logits(hidden).float(), k)

    def fused_topk(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`topk_values` without reading the device: values and ids, and a device bool that is
        set when the logits transform (a soft-cap) rounded two ranked logits to one value; HF's
        argmax then takes the lower id, so the caller must take the full logits instead (None:
        the model does not transform its logits, no tie can come of it)."""
        batch, num_nodes, width = hidden.shape
        if not self.fused_lm_head:
            return (*self._full_topk(hidden, k), None)
        weight = self.lm_head.weight
        wanted = min(k + 1, self.vocab_size) if self.transforms_logits else k
        values, ids = ops.lm_head_topk(hidden.reshape(batch * num_nodes, width).to(weight.device), weight, wanted)
        values, ids = values.view(batch, num_nodes, wanted), ids.view(batch, num_nodes, wanted)
        if not self.transforms_logits:
            return values, ids, None
        # In the model's dtype, as its forward computes them.
        values = self.scale_logits(values.to(weight.dtype)).float()
        return values[..., :k], ids[..., :k], (values[..., 1:] == values[..., :-1]).any()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, H] -> full logits [B, T, V] in the model's dtype, from the LM head module
        (sampling needs them all), as the model's forward returns them (`scale_logits`)."""
        return self.scale_logits(self.lm_head(hidden.to(self.lm_head_device)))


def text_config(config):
    """The decoder's config: a multimodal config's text config, else the config itself."""
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` computes. A module that accelerate offloads (`cpu_offload`, a `device_map`
    with "cpu" or "disk" entries) keeps its weights on the meta device, and the hook on it or on
    its submodules (one per device_map entry, or per leaf) loads them onto its execution device
    for each forward. Otherwise the device of its first parameter or buffer (the CPU with none)."""
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        for part in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # SequentialHook
            device = getattr(part, "execution_device", None)
            if device is not None:
                return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def plain_linear(module: torch.nn.Module) -> bool:
    """A bias-free nn.Linear (not a subclass) with resident, unsharded weights that no hook,
    instance forward or parametrization changes: its logits are exactly `hidden @ weight.T`."""
    from torch.nn.modules import module as torch_module

    return (type(module) is torch.nn.Linear and module.bias is None and "forward" not in module.__dict__
            and not module._forward_hooks and not module._forward_pre_hooks
            and not torch_module._global_forward_hooks and not torch_module._global_forward_pre_hooks
            and module.weight.device.type != "meta" and not parallel.is_distributed(module.weight))


@contextlib.contextmanager
def swapped_layers(base: torch.nn.Module, layers: torch.nn.ModuleList | None):
    """Within the block `base` runs `layers` (None: its own), swapped in where it keeps them. A
    model that reads a layer's type by its position (Gemma 3's rotary, `config.layer_types[i]`)
    reads the subset's own types meanwhile."""
    if layers is None:
        yield
        return
    full = base._modules["layers"]
    config = base.config
    types = getattr(config, "layer_types", None)
    base._modules["layers"] = layers
    if types is not None:
        index = {id(layer): i for i, layer in enumerate(full)}
        config.layer_types = [types[index[id(layer)]] for layer in layers]
    try:
        yield
    finally:
        base._modules["layers"] = full
        if types is not None:
            config.layer_types = types
