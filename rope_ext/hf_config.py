"""Reading a transformers config into RotaryEmbedding's arguments (docs/math.md section 9.1).

Works on a ``PretrainedConfig`` or a plain dict of its fields, old and new layouts:
current configs keep everything in ``rope_parameters``; older ones have top-level
``rope_theta`` / ``partial_rotary_factor`` and a ``rope_scaling`` dict; GPT-NeoX and
GPT-J have names of their own. transformers is never imported here.
"""




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


def _rope_dict(get, layer_type):
    params = get("rope_parameters") or get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise TypeError(f"config.rope_parameters must be a dict, got {type(params).__name__}")
    # Hybrid models (Gemma 2/3) hold one dict per layer type.
    if params and all(isinstance(v, dict) for v in params.values()):
        if layer_type not in params:
            raise ValueError(f"layer_type {layer_type!r} not in config.rope_parameters "
                             f"(has {sorted(params)})")
        params = params[layer_type]
    return dict(params)


def _head_dim(get):
    head_dim = get("head_dim")
    if head_dim:
        return int(head_dim)
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    if not hidden or not heads:
        raise ValueError("config needs head_dim, or hidden_size and num_attention_heads")
    return hidden // heads


def rotary_kwargs(config, layer_type="full_attention"):
    """RotaryEmbedding keyword arguments (all but layout) for a transformers config."""
    if config is None:
        raise TypeError("config must be a transformers PretrainedConfig or a dict, got None")
    config = _text_config(config)
    get = _getter(config)
    model_type = get("model_type", "") or ""
    params = _rope_dict(get, layer_type)
    head_dim = _head_dim(get)

    interleaved = model_type == "gptj"
    if model_type == "gptj":
        # GPT-J rotates config.rotary_dim dims (all when None) with base 10000 hard-coded.
        rotary_dim = get("rotary_dim") or head_dim
        base = 10000.0
    else:
        factor = params.get("partial_rotary_factor", get("partial_rotary_factor"))
        if factor is None and model_type == "gpt_neox":
            factor = get("rotary_pct", 0.25)
        factor = 1.0 if factor is None else float(factor)
        rotary_dim = int(head_dim * factor)
        base = params.get("rope_theta", get("rope_theta", get("rotary_emb_base", 10000.0)))
    if rotary_dim % 2:
        raise ValueError(f"the config's rotary dimension {rotary_dim} (head_dim {head_dim} x "
                         f"partial rotary factor) is odd; RoPE rotates pairs")

    max_positions = int(get("max_position_embeddings") or 4096)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if model_type == "phi3" and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # Phi-3's legacy names, mapped as Phi3Config does
    mrope_section = params.get("mrope_section")
    if rope_type == "mrope":
        rope_type = "default"  # Qwen2-VL checkpoints: default frequencies plus mrope_section

    scaling = None
    if rope_type != "default":
        scaling = {k: v for k, v in params.items()
                   if k not in ("rope_theta", "partial_rotary_factor", "mrope_section",
                                "mrope_interleaved", "type")}
        scaling["rope_type"] = rope_type
        if rope_type in ("llama3", "yarn", "longrope"):
            # A top-level original_max_position_embeddings (Phi-3 style) wins.
            original = get("original_max_position_embeddings") or params.get(
                "original_max_position_embeddings") or max_positions
            scaling["original_max_position_embeddings"] = original
        if rope_type in ("yarn", "longrope"):
            scaling.setdefault("max_position_embeddings", max_positions)
    return dict(head_dim=head_dim, rotary_dim=rotary_dim, base=float(base),
                max_positions=max_positions, scaling=scaling, interleaved=interleaved,
                mrope_section=mrope_section,
                mrope_interleaved=bool(params.get("mrope_interleaved", False)))
