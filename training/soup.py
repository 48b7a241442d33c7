"""``python -m matryoshka.training.soup``: weight-space interpolation of two reranker folders (WiSE-FT).

For each ``L`` of ``weights`` the soup is ``base + L * (tuned - base)`` on every floating-point tensor (``L = 0`` is
``base``, ``L = 1`` is ``tuned``). The two folders must be :class:`LayerwiseReranker` folders with the same
configuration apart from the measured calibration, and the same parameter names and shapes. Each exit's scale and
bias are recorded from the interpolated parameters and its residual std is measured again on ``residual_set`` (on
cached segment means, as :mod:`~matryoshka.training.segment_heads` measures it), so a soup exports like any trained
model. Segment-attention models only. Soup ``L`` is written atomically to ``<output_dir>/soup-<L>/``; an existing
folder is refused unless ``overwrite``. ``<output_dir>/soups.json`` lists what was mixed. Neither input is touched.

CLI::

    python -m matryoshka.training.soup --base runs/heads/model --tuned runs/heads-final/model \
        --weights 0.25 0.5 0.75 --residual_set runs/train/nfcorpus-dev --output_dir runs/soups
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from matryoshka.checks import is_int
from matryoshka.errors import ModelConfigError, OptionError, cli_main
from matryoshka.io.jsonfile import write_json_object

#: configuration fields a soup may take from ``tuned`` although they differ from ``base`` (measured, not built)
MEASURED_FIELDS = ("compensation", "versions")


def interpolate_states(base: Mapping[str, Tensor], tuned: Mapping[str, Tensor], weight: float,
                       option: str = "weights") -> dict[str, Tensor]:
    """``base + weight * (tuned - base)`` for floating-point tensors; other tensors (ids, counters) from ``tuned``.
    Different parameter names or shapes raise :class:`OptionError` naming ``option``."""
    differ = sorted(set(base) ^ set(tuned))
    if differ:
        raise OptionError(option, weight, f"models with the same parameters (they differ in {differ[:3]})")
    shapes = [k for k in base if base[k].shape != tuned[k].shape]
    if shapes:
        raise OptionError(option, weight, f"models with the same parameter shapes ({shapes[0]}: "
                                          f"{tuple(base[shapes[0]].shape)} vs {tuple(tuned[shapes[0]].shape)})")
    return {k: (b + weight * (tuned[k] - b)) if b.is_floating_point() else tuned[k].clone()
            for k, b in base.items()}


@dataclass
class SoupArguments:
    base: str = field(metadata={"help": "reranker folder the soups start from (L = 0), e.g. the frozen-final run"})
    tuned: str = field(metadata={"help": "reranker folder they move towards (L = 1), e.g. the trained-final run"})
    weights: list[float] = field(metadata={"help": "interpolation weights L, each in [0, 1]"})
    output_dir: str = field(metadata={"help": "soup L goes to <output_dir>/soup-<L>"})
    residual_set: str = field(metadata={"help": "training set (matryoshka.training.mining) on which each soup's "
                                                "residual std per exit is measured; not a reported test set"})
    cache: str = field(default="", metadata={"help": "segment-cache folder to reuse (e.g. the training run's "
                                                     "<output_dir>/segment-cache); '' = encode afresh"})
    group_size: int = field(default=32, metadata={"help": "passages per query in the residual measurement"})
    overwrite: bool = field(default=False, metadata={"help": "replace existing soup folders"})
    threads: int = field(default=0, metadata={"help": "torch threads (0 = torch's default)"})

    def __post_init__(self) -> None:
        if not self.weights or not all(isinstance(w, float | int) and 0.0 <= w <= 1.0 for w in self.weights):
            raise OptionError("weights", self.weights, "one or more numbers in [0, 1]")
        if len(set(self.weights)) != len(self.weights):
            raise OptionError("weights", self.weights, "distinct weights")
        if not is_int(self.group_size, 2):
            raise OptionError("group_size", self.group_size, "an integer >= 2 (a positive and a candidate)")
        if not is_int(self.threads, 0):
            raise OptionError("threads", self.threads, "an integer >= 0")
        for name in ("base", "tuned"):
            if Path(getattr(self, name)).resolve() == Path(self.output_dir).resolve():
                raise OptionError("output_dir", self.output_dir, f"a folder other than --{name}")


def check_compatible(base_config: dict, tuned_config: dict) -> None:
    """Refuse two configurations that differ in anything but :data:`MEASURED_FIELDS` (one line naming the field)."""
    for key in sorted(set(base_config) | set(tuned_config)):
        if key not in MEASURED_FIELDS and base_config.get(key) != tuned_config.get(key):
            raise ModelConfigError(f"--base and --tuned differ in {key!r} ({base_config.get(key)!r} vs "
                                   f"{tuned_config.get(key)!r}): expected two runs of the same model "
                                   "(same base, exits, layout and readout)")


def soup_folder_name(weight: float) -> str:
    return f"soup-{weight:g}"


def make_soups(args: SoupArguments) -> list[Path]:
    """Write every soup of ``args`` (see the module docstring); returns the folders."""
    from matryoshka.training.data import load_training_set
    from matryoshka.training.modeling import LayerwiseReranker
    from matryoshka.training.segment_cache import SegmentCache
    from matryoshka.training.segment_heads import encode_sets, measure_cached_residuals

    if args.threads:
        torch.set_num_threads(args.threads)
    base, tuned = LayerwiseReranker.load(args.base), LayerwiseReranker.load(args.tuned)
    check_compatible(base.config.to_dict(), tuned.config.to_dict())
    if tuned.segment_start is None:
        raise ModelConfigError(f"{args.tuned} has attention={tuned.config.attention!r}: soups re-measure residuals "
                               "on cached segment means, which needs attention='segments'")
    residual_set = load_training_set(args.residual_set)
    out = Path(args.output_dir)
    targets = [out / soup_folder_name(w) for w in args.weights]
    existing = [str(t) for t in targets if t.exists()]
    if existing and not args.overwrite:
        raise FileExistsError(f"{existing[0]} exists: pass --overwrite to replace it, or choose another --output_dir")
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    tuned_state = {k: v.detach().clone() for k, v in tuned.state_dict().items()}   # tuned is reused below
    # the segment means depend on the backbone only: with one backbone (the segment-heads case) encode them once
    same_backbone = all(torch.equal(b, tuned_state[k]) for k, b in base_state.items() if k.startswith("backbone."))
    data = None
    for weight, target in zip(args.weights, targets, strict=True):
        tuned.load_state_dict(interpolate_states(base_state, tuned_state, weight), strict=True)
        tuned.eval()
        if data is None or not same_backbone:
            data = encode_sets(SegmentCache(tuned, args.cache or None), [residual_set])
        measure_cached_residuals(tuned, data, args.group_size)
        tuned.save(target, overwrite=args.overwrite)
    record = {"base": str(Path(args.base).resolve()), "tuned": str(Path(args.tuned).resolve()),
              "formula": "base + L * (tuned - base)", "residual_set": str(Path(args.residual_set).resolve()),
              "soups": {soup_folder_name(w): w for w in args.weights}, "arguments": asdict(args)}
    write_json_object(out / "soups.json", record)
    return targets


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    from matryoshka.training.arguments import parse_arguments

    (args,) = parse_arguments((SoupArguments,), argv, prog="python -m matryoshka.training.soup")
    for folder in make_soups(args):
        print(f"soup written to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
