"""Reading a transformers config into RotaryEmbedding's arguments (docs/math.md section 9.1).

Works on a ``PretrainedConfig`` or a plain dict of its fields, old and new layouts:
current configs keep everything in ``rope_parameters``; older ones have top-level
``rope_theta`` / ``partial_rotary_factor`` and a ``rope_scaling`` dict; GPT-NeoX and
GPT-J have names of their own. transformers is never imported here.

Hybrid models (Gemma 2/3/4) may hold one rope dict per layer type ("sliding_attention",
"full_attention"); Gemma 4's full-attention layers also have a head_dim of their own
(transformers' ``per_layer_config``, or ``global_head_dim`` in a config.json).
"""

from typing import Optional, Tuple

# Gemma 4's text configs (and the two families built on them): transformers fills in these
# rope dicts when a config has none, and gives full-attention layers head_dim global_head_dim
# (512 when absent) unless the config carries a per_layer_config of its own.
_GEMMA4_TEXT = ("gemma4_text", "gemma4_unified_text", "diffusion_gemma_text")
_GEMMA4_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                       "rope_theta": 1000000.0},
}
_GEMMA4_GLOBAL_HEAD_DIM = 512
# Their rotary modules' "default" frequencies span the whole head whatever
# partial_rotary_factor says (their attention rotates the whole head); DiffusionGemma's honour it.
_DEFAULT_IGNORES_PARTIAL = ("gemma4_text", "gemma4_unified_text")

# GPT-2-style names (GPT-J's config.json): config objects translate them through their
# attribute_map, plain dicts do not.
_ALIASES = {"hidden_size": "n_embd", "num_attention_heads": "n_head",
            "max_position_embeddings": "n_positions"}


def _getter(config):
    if isinstance(config, dict):
        def get(name, default=None):
            value = config.get(name)
            if value is None and name in _ALIASES:
                value = config.get(_ALIASES[name])
            return default if value is None else value
        return get
    return lambda name, default=None: getattr(config, name, default)


def _text_config(config):
    """Multimodal configs (Qwen2-VL) keep the language model's fields in text_config."""
    text = config.get("text_config") if isinstance(config, dict) else getattr(
        config, "text_config", None)
    return text if text is not None else config


def _is_per_layer(params: dict) -> bool:
    """One rope dict (or None: no RoPE) per layer type, not one dict of rope keys."""
    values = list(params.values())
    return (bool(values) and all(v is None or isinstance(v, dict) for v in values)
            and any(isinstance(v, dict) for v in values))


def _rope_dict(get, layer_type):
    model_type = get("model_type", "") or ""
    params = get("rope_parameters") or get("rope_scaling")
    if params is None and model_type in _GEMMA4_TEXT:
        params = _GEMMA4_ROPE
    params = params or {}
    if not isinstance(params, dict):
        raise TypeError(f"config.rope_parameters must be a dict, got {type(params).__name__}")
    layer_types = get("layer_types")
    if not _is_per_layer(params):
        # One dict for every layer; a layer_type the config does not declare is a mistake.
        if (layer_type is not None and isinstance(layer_types, (list, tuple))
                and layer_type not in layer_types):
            raise ValueError(f"layer_type {layer_type!r} is not one of the config's layer types "
                             f"{sorted(set(layer_types))}")
        return dict(params)
    available = sorted(params)
    if layer_type is None:
        raise ValueError(f"config.rope_parameters holds one dict per layer type; pass "
                         f"layer_type, one of {available}")
    if layer_type not in params:
        raise ValueError(f"layer_type {layer_type!r} is not in config.rope_parameters; the "
                         f"available layer types are {available}")
    if params[layer_type] is None:
        raise ValueError(f"config.rope_parameters[{layer_type!r}] is None: layers of type "
                         f"{layer_type!r} use no RoPE")
    return dict(params[layer_type])


def _dict_layer_overrides(config: dict, layer_type: str) -> dict:
    """The fields that layers of `layer_type` override in a plain config dict (head_dim)."""
    per_layer = config.get("per_layer_config")
    if per_layer is None:
        if config.get("model_type") in _GEMMA4_TEXT and layer_type == "full_attention":
            return {"head_dim": config.get("global_head_dim", _GEMMA4_GLOBAL_HEAD_DIM)}
        return {}
    layer_types = config.get("layer_types")
    if not isinstance(layer_types, (list, tuple)) or layer_type not in layer_types:
        return {}
    if not isinstance(per_layer, dict):
        raise TypeError(f"config['per_layer_config'] must be a dict, got "
                        f"{type(per_layer).__name__}")
    # Keys are layer indices; config.json writes them as zero-padded strings ("05").
    by_index = {int(k): v or {} for k, v in per_layer.items()}
    indices = [i for i, t in enumerate(layer_types) if t == layer_type]
    overrides = [{k: v for k, v in by_index.get(i, {}).items() if k != "skip"} for i in indices]
    if any(o != overrides[0] for o in overrides):
        raise ValueError(f"the layers of type {layer_type!r} differ in "
                         f"config['per_layer_config']; one rotary embedding cannot serve them all")
    return overrides[0]


def _layer_config(config, layer_type):
    """The config as the layers of `layer_type` see it (Gemma 4: their own head_dim)."""
    if layer_type is None:
        return config
    if isinstance(config, dict):
        overrides = _dict_layer_overrides(config, layer_type)
        return dict(config, **overrides) if overrides else config
    # transformers' heterogeneous configs refuse to read a per-layer field (head_dim) from the
    # global config; their per_layer_config view resolves it for a layer type (and raises
    # ValueError when layers of that type differ or the type is not declared).
    if getattr(config, "is_heterogeneous", False):
        return config.per_layer_config[layer_type]
    return config


def _check_global_head_dim(config, layer_type):
    """A transformers config whose head_dim differs per layer needs a layer_type to say which."""
    if (layer_type is None and not isinstance(config, dict)
            and "head_dim" in (getattr(config, "per_layer_attributes", None) or ())):
        layer_types = sorted(set(getattr(config, "layer_types", None) or ()))
        raise ValueError(f"config's head_dim differs between layers (per_layer_config); pass "
                         f"layer_type, one of {layer_types}")


def _head_dim(get):
    head_dim = get("head_dim")
    if head_dim:
        return int(head_dim)
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    if not hidden or not heads:
        raise ValueError("config needs head_dim, or hidden_size and num_attention_heads")
    return hidden // heads


def _settings(config, layer_type):
    """(get, model_type, params, head_dim, rotary_dim, base, scaling) of the text config."""
    if config is None:
        raise TypeError("config must be a transformers PretrainedConfig or a dict, got None")
    if layer_type is not None and not isinstance(layer_type, str):
        raise TypeError(f"layer_type must be a str or None, got {type(layer_type).__name__}")
    config = _text_config(config)
    params = _rope_dict(_getter(config), layer_type)
    _check_global_head_dim(config, layer_type)
    get = _getter(_layer_config(config, layer_type))
    model_type = get("model_type", "") or ""
    head_dim = _head_dim(get)

    rope_type = params.get("rope_type", params.get("type", "default"))
    if model_type == "phi3" and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # Phi-3's legacy names, mapped as Phi3Config does
    if rope_type == "mrope":
        rope_type = "default"  # Qwen2-VL checkpoints: default frequencies plus mrope_section

    if model_type == "gptj":
        # GPT-J rotates config.rotary_dim dims (all when None) with base 10000 hard-coded.
        rotary_dim = get("rotary_dim") or head_dim
        base = 10000.0
    else:
        factor = params.get("partial_rotary_factor", get("partial_rotary_factor"))
        if factor is None and model_type == "gpt_neox":
            factor = get("rotary_pct", 0.25)
        if rope_type == "proportional":
            # The table spans the whole head; the fraction that rotates is a scaling key.
            if factor is not None:
                params["partial_rotary_factor"] = factor
            factor = None
        elif rope_type == "default" and model_type in _DEFAULT_IGNORES_PARTIAL:
            factor = None
        factor = 1.0 if factor is None else float(factor)
        rotary_dim = int(head_dim * factor)
        base = params.get("rope_theta", get("rope_theta", get("rotary_emb_base", 10000.0)))
    if rotary_dim % 2:
        raise ValueError(f"the config's rotary dimension {rotary_dim} (head_dim {head_dim} x "
                         f"partial rotary factor) is odd; RoPE rotates pairs")

    max_positions = int(get("max_position_embeddings") or 4096)
    scaling = None
    if rope_type != "default":
        dropped = ("rope_theta", "mrope_section", "mrope_interleaved", "type")
        if rope_type != "proportional":
            dropped += ("partial_rotary_factor",)
        scaling = {k: v for k, v in params.items() if k not in dropped}
        scaling["rope_type"] = rope_type
        if rope_type in ("llama3", "yarn", "longrope"):
            # A top-level original_max_position_embeddings (Phi-3 style) wins.
            original = get("original_max_position_embeddings") or params.get(
                "original_max_position_embeddings") or max_positions
            scaling["original_max_position_embeddings"] = original
        if rope_type in ("yarn", "longrope"):
            scaling.setdefault("max_position_embeddings", max_positions)
    return get, model_type, params, head_dim, rotary_dim, float(base), scaling


def rotary_settings(config, layer_type: Optional[str] = None) -> Tuple[int, float, Optional[dict]]:
    """``(rotary_dim, base, scaling)`` of a transformers config, for one layer type.

    Args:
        config: a transformers ``PretrainedConfig`` or a plain dict of its fields
            (multimodal configs are read through their ``text_config``).
        layer_type: the layer type ("sliding_attention", "full_attention", ...) for
            configs that hold one rope dict per layer type (Gemma 2/3/4); a layer type's
            own head_dim (Gemma 4's full-attention layers) is read too. Ignored by
            configs with one rope dict, unless they declare layer_types without it.

    Returns:
        The arguments of :func:`rope_ext.rope_frequencies` that give transformers'
        ``inv_freq`` for those layers: rotary_dim (for "proportional", the whole head),
        base (rope_theta), and the scaling dict (None for default RoPE).

    Raises:
        ValueError: the config holds one rope dict per layer type and `layer_type` is None
            or not one of them (the message names the available ones), or that layer
            type's dict is None (no RoPE), or the rotary dim is odd.
    """
    _, _, _, _, rotary_dim, base, scaling = _settings(config, layer_type)
    return rotary_dim, base, scaling


def rotary_kwargs(config, layer_type: Optional[str] = None) -> dict:
    """RotaryEmbedding keyword arguments (all but layout) for a transformers config.

    `layer_type` as for :func:`rotary_settings`.
    """
    get, model_type, params, head_dim, rotary_dim, base, scaling = _settings(config, layer_type)
    return dict(head_dim=head_dim, rotary_dim=rotary_dim, base=base,
                max_positions=int(get("max_position_embeddings") or 4096), scaling=scaling,
                interleaved=model_type == "gptj", mrope_section=params.get("mrope_section"),
                mrope_interleaved=bool(params.get("mrope_interleaved", False)))
