"""The training configuration of the kit's model builds: :class:`TrainConfig` (everything that determines a
trained model: architecture, data, stages, learning rates, precision, decoder, LoRA; its :meth:`~TrainConfig.digest`
names the build's cache folder and the shipped weights) and its named presets (:data:`PRESETS`, :func:`preset`:
``tiny``, ``ci``, ``micro``, ``smol``, ``smol-micro``). The stages these fields drive are
:mod:`ellava_lib.model.train`'s, which re-exports these names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace

from ellava_lib.core.schema import SUITES
from ellava_lib.model import lora, smol
from ellava_lib.model.tiny import TinyConfig

PRECISIONS = ("bf16", "fp32")


@dataclass
class TrainConfig:
    """Everything that determines the trained model (its hash names the cache entry).

    ``processes`` is kept only so the digests (cache names) of existing configs stay what they were: training
    runs in one process, and :func:`train` refuses any other value.

    ``lm`` picks the decoder: ``""`` the tiny Llama of ``model`` trained from scratch (the ``lm_*`` sizes), or a
    pretrained one (:data:`smol.LMS`: ``"smollm2"`` from its GGUF, ``"micro-llama"`` its test-size stand-in) with
    the vision tower of ``model`` (``vit_*``). ``lm_lr`` is the decoder's learning rate in the joint stage
    (0 = ``lr``, one rate for everything as the tiny recipe has it); ``align_embeddings`` whether the alignment
    stage trains the input embeddings beside the projector.
    """

    model: TinyConfig = field(default_factory=TinyConfig)
    seed: int = 0
    data_seed: int = 0
    n_train: dict[str, int] = field(default_factory=lambda: {"sqa": 8000, "vizwiz": 6000, "mmvet": 6000,
                                                             "llavabench": 6000})
    # not cut for the 15-minute budget: 1200 / 600 / 1000 steps (induction / text / joint) took the default
    # pipeline's dense mean from 68.7 to 59.4 (sqa 52.0 -> 41.6; its copy loss ended at 0.23, not 0.08); keeping
    # the 1500 induction steps and cutting text / joint to 500 / 1000 built in 425 s instead of 608 s and still
    # lost 7.7 points on every suite (mean 61.0: sqa 43.4, vizwiz 70.5, mmvet 55.2, llavabench 74.7; 500 test items)
    induction_steps: int = 1500
    induction_lr: float = 3e-3
    text_steps: int = 1000
    drill_frac: float = 0.3
    value_layer: int = 3
    value_weight: float = 1.0
    joint_value_weight: float = 0.0
    vision_steps: int = 150
    vision_lr: float = 2e-3
    align_steps: int = 150
    joint_steps: int = 1700
    lr: float = 2e-3
    batch_size: int = 32
    warmup: int = 50
    aux_weight: float = 0.3
    weight_decay: float = 0.01
    precision: str = "bf16"  # "bf16": matmuls under CPU autocast (fp32 master weights); "fp32": none
    length_group: int = 8  # text and joint batches drawn in groups of this many, sorted by length (1 = off)
    threads: int = 2  # intra-op threads of the training process (0 = torch default)
    processes: int = 1  # must be 1 (hashed, see above); one process with two threads was faster than the
    # former two data-parallel processes with one thread each on the 2-core machine this kit is built on
    lm: str = ""  # "" = the tiny decoder from scratch; "smollm2" / "micro-llama" = a pretrained one (smol.LMS)
    lm_lr: float = 0.0  # the decoder's learning rate in the joint stage; 0 = lr
    align_embeddings: bool = True  # the alignment stage trains the input embeddings too (False: projector only)
    lora_rank: int = 0  # > 0: the pretrained decoder is tuned through LoRA adapters of this rank (lora.py); 0 = fully
    lora_alpha: float = 0.0  # the adapters' scale is lora_alpha / lora_rank
    lora_modules: str = ",".join(lora.DECODER_LINEARS)  # comma-separated decoder linears that get an adapter

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown training precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.lm and self.lm not in smol.LMS:
            raise ValueError(f"unknown language model {self.lm!r}; choose from \"\" (tiny), {', '.join(smol.LMS)}")
        if self.lora_rank and not self.lm:
            raise ValueError("LoRA adapters tune a pretrained decoder: set lm (the tiny decoder trains from scratch)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["model"] = TinyConfig(**d.get("model", {}))
        return cls(**d)

    def digest(self) -> str:
        """Short stable hash of the config (names the cache folder). A disabled lever (induction stage,
        drills, value loss) or an option at its neutral value (:data:`_NEUTRAL`) trains exactly as before it
        existed, so it hashes as before."""
        d = self.to_dict()
        for name, neutral in _NEUTRAL.items():
            if d[name] == neutral:
                d.pop(name)
        for switch, fields in _OPTIONAL_LEVERS.items():
            if not d[switch]:
                for f in fields:
                    d.pop(f)
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]

    @classmethod
    def micro(cls) -> "TrainConfig":
        """A model trained in seconds, for tests (it learns little)."""
        return cls(model=TinyConfig.micro(), n_train={s: 64 for s in SUITES}, induction_steps=0, text_steps=5,
                   vision_steps=10, align_steps=5, joint_steps=20, batch_size=16, warmup=5,
                   drill_frac=0.0, value_layer=0)

    @classmethod
    def ci(cls) -> "TrainConfig":
        """The tiny architecture trained briefly (about a minute): for the CI profile of the notebooks."""
        return cls(n_train={s: 600 for s in SUITES}, induction_steps=0, text_steps=40, vision_steps=40, align_steps=30,
                   joint_steps=120, warmup=20, drill_frac=0.0, value_layer=0)

    @classmethod
    def smol(cls) -> "TrainConfig":
        """SmolLM2-135M-Instruct with the tiny tier's vision tower (:mod:`ellava_lib.model.smol`): vision stage,
        projector alignment with the decoder frozen, then instruction tuning of everything (decoder at ``lm_lr``
        = 1e-4, the new parts at ``lr`` = 1e-3) for 1200 steps of 16 rows (about 0.75 epoch of the 26,000-item
        train split; rows are 47 tokens on average, at most 77). The vision and alignment stages draw 32 images
        per step, so they get twice the tiny recipe's steps (300 each; under 0.1 s and 0.5 s a step).

        Build time on the 2-core machine (``threads=2``, bf16 autocast), measured nice'd while other jobs shared
        the cores (load average 1.5 to 8), so the relative numbers are the solid ones. At load average about 2,
        a joint step took 2.1 to 5.3 s of wall time (median 3.7 s; rows of different lengths), as long as the
        reference forward+backward of SmolLM2 on 8 x 128 tokens run just before it (median ratio 0.81; that
        reference takes 2.65 s on idle cores); under heavier load the steps took 4.4 to 42 s at a median ratio
        of 1.09, and single-threaded 6.4 s of CPU time per step against 7.4 to 10.5 s for the reference. Hence
        2.1 to 3.7 s per joint step on idle cores, about 3 s: a build of about 65 minutes (1200 x 3 s, plus
        loading, 25 s, encoding the train split, the vision and alignment stages, and the checkpoints, 1.6 GB
        every 50 steps, a few seconds each).
        """
        return cls(lm="smollm2", induction_steps=0, text_steps=0, drill_frac=0.0, value_layer=0,
                   vision_steps=300, vision_lr=2e-3, align_steps=300, joint_steps=1200, lr=1e-3, lm_lr=5e-4,
                   batch_size=16, warmup=50, align_embeddings=False, lora_rank=16, lora_alpha=32.0)

    @classmethod
    def smol_micro(cls) -> "TrainConfig":
        """The smol recipe on the micro Llama (:func:`smol.micro_llama`) with the micro vision tower: trains in
        seconds, for tests."""
        return replace(cls.smol(), lm="micro-llama", model=TinyConfig.micro(), n_train={s: 64 for s in SUITES},
                       vision_steps=6, align_steps=4, joint_steps=10, batch_size=8, warmup=3)

    def lora_targets(self) -> tuple[str, ...]:
        """The decoder linears that get a LoRA adapter (``lora_modules`` split)."""
        return tuple(m.strip() for m in self.lora_modules.split(",") if m.strip())

    def kind(self) -> str:
        """The model tier the config builds: ``tiny`` (its own decoder) or ``smol`` (a pretrained one)."""
        return "smol" if self.lm else "tiny"


# switch field -> the fields it makes meaningful (dropped from the digest when the switch is off)
_OPTIONAL_LEVERS = {"induction_steps": ("induction_steps", "induction_lr"), "drill_frac": ("drill_frac",),
                    "value_layer": ("value_layer", "value_weight", "joint_value_weight"),
                    "lora_rank": ("lora_rank", "lora_alpha", "lora_modules")}
# field -> the value at which it trains exactly as before the field existed (dropped from the digest there):
# full precision, ungrouped batches, the tiny decoder, one learning rate, embeddings trained in the alignment
_NEUTRAL = {"precision": "fp32", "length_group": 1, "lm": "", "lm_lr": 0.0, "align_embeddings": True}


PRESETS = {"tiny": TrainConfig, "ci": TrainConfig.ci, "micro": TrainConfig.micro, "smol": TrainConfig.smol,
           "smol-micro": TrainConfig.smol_micro}


def preset(name: str) -> TrainConfig:
    """The train config of a named preset: ``tiny`` (the embedded default), ``ci``, ``micro``, ``smol``
    (SmolLM2-135M) or ``smol-micro`` (the smol recipe on a test-size Llama)."""
    if name not in PRESETS:
        raise ValueError(f"unknown train preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]()
