"""``python -m rope_ext.hf``: what rope_ext.hf patches in the installed transformers, as
markdown (docs/hf_families.md is this output for the transformers the tests pin).

Every discovered modeling module is imported (about ten seconds) and patched, and the
report is written out: the model types whose RoPE runs through rope_ext, by form; the
attention classes with the fused QK-norm + RoPE; and what is left alone, with the reason.
"""

import collections
import importlib
import sys


def model_types_by_module():
    """modeling module -> the config.model_type values whose code lives there."""
    from transformers.models.auto.configuration_auto import (CONFIG_MAPPING_NAMES,
                                                             model_type_to_module_name)

    out = collections.defaultdict(list)
    for model_type in CONFIG_MAPPING_NAMES:
        folder = model_type_to_module_name(model_type)
        out[f"transformers.models.{folder}.modeling_{folder.rsplit('.', 1)[-1]}"].append(
            model_type)
    return out


def markdown() -> str:
    """The report of a patch() of every discovered module, as markdown."""
    import transformers

    import rope_ext.hf as hf
    from rope_ext.hf import registry

    hf.patch()
    for name in registry.discovered():
        importlib.import_module(name)
    rep = hf.report()
    types = model_types_by_module()

    def short(module):
        return module.split(".")[2]

    def named(module):
        return ", ".join(sorted(types.get(module, []))) or f"({short(module)})"

    by_form = collections.defaultdict(list)
    for module, functions in rep.patched.items():
        for fn, form in functions.items():
            by_form[form].append((named(module), fn))
    lines = [
        f"# Model families rope_ext.hf patches (transformers {transformers.__version__})",
        "",
        "Written by `python -m rope_ext.hf` (`make hf-families`); a test checks that it is the",
        "output for the transformers the tests pin. The model types are transformers'",
        "`config.model_type` values whose modeling module holds the function.",
        "",
        f"- modeling modules with a RoPE function (discovered): {len(rep.discovered)}",
        f"- modules with a function patched: {len(rep.patched)} "
        f"({sum(len(f) for f in rep.patched.values())} functions)",
        f"- attention classes fused (QK-norm + RoPE in one op): {len(rep.fused)}",
        f"- functions or classes left alone: {len(rep.left_alone)}",
        "",
        "## Patched, by form",
        "",
        "| form | function | model types |",
        "|---|---|---|",
    ]
    for form in (f.name for f in hf.FORMS):
        for model_types, fn in sorted(by_form.get(form, [])):
            lines.append(f"| {form} | `{fn}` | {model_types} |")
    lines += ["", "## Fused QK-norm + RoPE", "", "| attention class | model types |", "|---|---|"]
    for cls in sorted(rep.fused):
        module, name = cls.rsplit(".", 1)
        lines.append(f"| `{name}` | {named(module)} |")
    lines += ["", "## Left alone", "", "| function or class | model types | why |", "|---|---|---|"]
    for key, why in sorted(rep.left_alone.items()):
        module = ".".join(key.split(".")[:4])
        lines.append(f"| `{key[len(module) + 1:] or key}` | {named(module)} | {why} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
