"""Experiment configuration: a structured OmegaConf schema built from dataclasses.

`load_config(path, overrides)` merges YAML and `key=value` overrides onto the schema;
unknown keys and values of the wrong type fail with the key's full path, and
`validate()` checks relations between fields, again naming the key and the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.config import DataConfig, SourceConfig
from models.config import ModelConfig
from parallel import layout
from parallel.ema import check_decay
from parallel.recompute import DEEPSEEK_V3_MODULES, check_recompute


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


@dataclass
class RunConfig:
    name: str = "moeforge"
    dir: str = "runs/${run.name}"  # rerunning with the same dir resumes from its newest checkpoint
    seed: int = 0


@dataclass
class DeepSpeedSettings:
    """parallel.data_parallel=deepspeed (parallel/deepspeed_engine.py)."""

    zero_stage: int = 1  # 1: AdamW state sharded | 2: + gradients | 3: refused (parallel/layout.py says why)
    offload_optimizer: str = "none"  # none | cpu: AdamW state and update in host memory (ZeRO-Offload)
    cpu_adam: bool = True  # offload with DeepSpeedCPUAdam (JIT-built C++); false: torch's AdamW on the host


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: Union[int, str] = "auto"  # auto: the world size left after pp x dp_replicate x tp (parallel/layout.py)
    tp: int = 1
    pp: int = 1
    ep: int = 1
    data_parallel: str = "fsdp"  # fsdp (FSDP2) | zero1 (replicated params, sharded optimizer) | deepspeed
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    # GPipe | 1F1B | Interleaved1F1B | LoopedBFS | InterleavedZeroBubble | ZBVZeroBubble | DualPipeV
    pipeline_schedule: str = "1F1B"
    pipeline_microbatches: Optional[int] = None  # = train.grad_accum_steps (the pipeline's micro-batches)
    pipeline_stages_per_rank: Optional[int] = None  # virtual stages: 1 for GPipe/1F1B, 2 (default) for the others
    pipeline_layers_per_stage: Optional[list[int]] = None  # one count per stage (pp x stages_per_rank); None: even
    pipeline_mtp_stage: bool = False  # final norm + head + MTP as a stage of their own (no transformer layers)
    ep_overlap: bool = True  # dispatch all-to-all in flight while the shared experts compute (parallel/OVERLAP.md)
    # ranks of one EP group per node; auto: LOCAL_WORLD_SIZE / tp at start-up (parallel/layout.py). An EP group
    # over several nodes dispatches hierarchically, each routing group on one node (parallel/node_dispatch.py)
    ep_ranks_per_node: Union[int, str] = "auto"
    # tp > 1: norms, residuals, router and dispatch on each tp rank's sequence shard (parallel/sequence_parallel.py)
    sequence_parallel: bool = True


@dataclass
class OptimConfig:
    lr: float = 2.2e-4
    min_lr: float = 2.2e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norms and biases (1-D parameters)
    grad_clip: float = 1.0  # global L2 norm; 0 disables
    warmup_steps: int = 2000  # linear warmup from 0
    constant_steps: int = 0  # steps at peak lr after warmup
    decay_steps: Optional[int] = None  # cosine decay to min_lr; None = until train.steps
    bf16_moments: bool = False  # keep AdamW moments in bf16 (DeepSeek-V3 §3.3.4)


@dataclass
class PiecewiseSchedule:
    """values[i] holds until boundaries[i] (in `unit`); the last value holds after. Empty: model default."""

    values: list[float] = field(default_factory=list)
    boundaries: list[int] = field(default_factory=list)
    unit: str = "steps"  # steps | tokens


@dataclass
class Fp8Config:
    """train.precision=fp8: DeepSeek-V3's fine-grained FP8 recipe (models/fp8.py, train/precision.py)."""

    # fnmatch globs over module names; matching nn.Linear layers and routed experts run their three GEMMs
    # in FP8. The embedding, MoE gate, norms and attention core never convert (they are not Linear).
    modules: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=lambda: ["lm_head"])  # output head stays bf16 (V3 §3.3.1)
    backend: str = "auto"  # auto | emulate | scaled_mm | blockwise (which runs where: models/fp8.py)


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch_size: int = 8  # sequences per micro-batch per data-parallel rank
    seq_len: int = 4096
    grad_accum_steps: int = 1
    precision: str = "fp32"  # fp32 | bf16 | fp8
    fp8: Fp8Config = field(default_factory=Fp8Config)
    # Activation recomputation (parallel/recompute.py says what each mode and module keeps and recomputes):
    # none | selective (the modules in recompute_modules) | full (every block, or every N-th: recompute_num_layers)
    recompute: str = "none"
    # layernorm | mla_up_proj | moe_act | core_attn | mlp | shared_experts (selective only)
    recompute_modules: list[str] = field(default_factory=lambda: list(DEEPSEEK_V3_MODULES))
    recompute_num_layers: int = 0  # full: 0 = every block, N = blocks at model position i with i % N == 0
    log_interval: int = 10
    # V3 §4.2: lambda 0.3 -> 0.1, gamma 0.001 -> 0; empty values = model.mtp_loss_weight / model.bias_update_speed
    mtp_weight: PiecewiseSchedule = field(default_factory=PiecewiseSchedule)
    bias_update_speed: PiecewiseSchedule = field(default_factory=PiecewiseSchedule)
    max_nonfinite_steps: int = 10  # consecutive NaN/Inf steps tolerated (each skipped) before stopping
    sample_prompt: str = ""  # printed sample at the end of a run ("" = none)
    sample_tokens: int = 64
    threads: Optional[int] = None  # torch intra-op threads on CPU (None: torch default)
    # CPU runs: glibc malloc keeps freed activation memory instead of re-faulting it every step
    # (train/allocator.py; ~10% faster steps, same peak memory)
    retain_host_memory: bool = True
    # EMA of the weights in CPU memory, updated on a background thread after each optimizer step
    # (DeepSeek-V3 §3.2.3; parallel/ema.py): 0 = off, else the decay d in ema <- d*ema + (1-d)*w
    ema_decay: float = 0.0
    ema_interval: int = 1  # update the EMA every N optimizer steps


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 3
    async_save: bool = False
    at_end: bool = True
    # An HF DeepSeek-V2/V3 directory (config.json + safetensors) whose weights start a fresh run; ignored
    # when run.dir already has a checkpoint to resume. `python -m train.hf.read DIR` prints its model section.
    init_from_hf: Optional[str] = None


@dataclass
class LogConfig:
    console: bool = True
    progress: bool = True  # progress bar with ETA (rank 0)
    wandb: bool = False
    wandb_project: str = "moeforge"
    wandb_mode: Optional[str] = None  # online | offline | disabled (None: WANDB_MODE or online)
    tensorboard: bool = False


@dataclass
class EvalConfig:
    """Held-out evaluation during training (train/evaluation.py): the same number under every layout."""

    sources: list[SourceConfig] = field(default_factory=list)  # the schema of data.sources; empty: no evaluation
    interval: int = 0  # evaluate after every `interval`-th optimizer step; 0: never
    tokens: int = 65536  # tokens evaluated each time: the first ones of the eval stream, the same every time


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def global_batch_sequences(self) -> int:
        dp = self.parallel.dp_replicate * self.parallel.dp_shard
        return self.train.micro_batch_size * self.train.grad_accum_steps * dp

    def validate(self, world_size: Optional[int] = None) -> None:
        """Cross-field checks; raise ConfigError naming the key and the fix. parallel.dp_shard auto
        becomes a number here, from `world_size` (None: torchrun's WORLD_SIZE, else one process)."""
        if world_size is None and os.environ.get("WORLD_SIZE"):
            world_size = int(os.environ["WORLD_SIZE"])
        try:
            self.parallel.dp_shard = layout.resolve_dp_shard(self.parallel, world_size)
            local = int(os.environ["LOCAL_WORLD_SIZE"]) if os.environ.get("LOCAL_WORLD_SIZE") else None
            self.parallel.ep_ranks_per_node = layout.resolve_ep_ranks_per_node(self.parallel, local)
        except layout.LayoutError as e:
            raise ConfigError(str(e)) from None
        try:
            self.model.validate()
            self.data.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        t, o, p = self.train, self.optim, self.parallel
        _check(t.steps > 0, "train.steps", f"must be > 0, got {t.steps}")
        _check(t.micro_batch_size > 0, "train.micro_batch_size", f"must be > 0, got {t.micro_batch_size}")
        _check(t.grad_accum_steps > 0, "train.grad_accum_steps", f"must be > 0, got {t.grad_accum_steps}")
        _check(t.seq_len > 0, "train.seq_len", f"must be > 0, got {t.seq_len}")
        _check(
            t.seq_len <= self.model.max_position_embeddings,
            "train.seq_len",
            f"{t.seq_len} exceeds model.max_position_embeddings={self.model.max_position_embeddings}; "
            "lower train.seq_len or raise max_position_embeddings",
        )
        _check(t.precision in ("fp32", "bf16", "fp8"), "train.precision", f"must be fp32|bf16|fp8, got {t.precision!r}")
        _check(
            t.fp8.backend in ("auto", "emulate", "scaled_mm", "blockwise"),
            "train.fp8.backend", f"must be auto|emulate|scaled_mm|blockwise, got {t.fp8.backend!r}",
        )
        _check(bool(t.fp8.modules), "train.fp8.modules", "must list at least one module pattern (\"*\" = all)")
        try:
            check_recompute(t.recompute, t.recompute_modules, t.recompute_num_layers)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        try:
            check_decay(t.ema_decay, t.ema_interval)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        _check(t.log_interval > 0, "train.log_interval", "must be > 0")
        _check(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
        _check(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be in [0, optim.lr={o.lr}], got {o.min_lr}")
        _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "must be two numbers in [0, 1)")
        _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
        _check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _check(o.constant_steps >= 0, "optim.constant_steps", "must be >= 0")
        _check(o.decay_steps is None or o.decay_steps > 0, "optim.decay_steps", "must be > 0 or null")
        for name in ("mtp_weight", "bias_update_speed"):
            s: PiecewiseSchedule = getattr(t, name)
            key = f"train.{name}"
            _check(s.unit in ("steps", "tokens"), f"{key}.unit", f"must be steps|tokens, got {s.unit!r}")
            if s.values:
                _check(
                    len(s.boundaries) == len(s.values) - 1,
                    f"{key}.boundaries",
                    f"needs len(values) - 1 = {len(s.values) - 1} entries, got {len(s.boundaries)}",
                )
                _check(list(s.boundaries) == sorted(s.boundaries), f"{key}.boundaries", "must be increasing")
                _check(all(v >= 0 for v in s.values), f"{key}.values", "must be >= 0")
            else:
                _check(not s.boundaries, f"{key}.boundaries", "given without values")
        for key in ("dp_replicate", "dp_shard", "tp", "pp", "ep"):
            _check(getattr(p, key) >= 1, f"parallel.{key}", f"must be >= 1, got {getattr(p, key)}")
        _check(p.data_parallel in ("fsdp", "zero1", "deepspeed"), "parallel.data_parallel",
               "must be fsdp|zero1|deepspeed")
        if p.data_parallel == "deepspeed":
            _validate_deepspeed(self)
        _check(
            p.pipeline_microbatches is None or p.pipeline_microbatches == t.grad_accum_steps,
            "parallel.pipeline_microbatches",
            f"the pipeline runs the step's train.grad_accum_steps={t.grad_accum_steps} micro-batches; "
            f"leave it unset or equal to that, got {p.pipeline_microbatches}",
        )
        _check(self.checkpoint.interval >= 0, "checkpoint.interval", "must be >= 0 (0 = only at the end)")
        _check(self.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        _check(t.max_nonfinite_steps >= 0, "train.max_nonfinite_steps", "must be >= 0")
        _validate_eval(self)
        _validate_layout_and_launch(self)


def _validate_deepspeed(cfg: "Config") -> None:
    """parallel.deepspeed.*, and the training settings the DeepSpeed engine does not take (not built)."""
    d = cfg.parallel.deepspeed
    _check(d.zero_stage in (1, 2, 3), "parallel.deepspeed.zero_stage", f"must be 1|2|3, got {d.zero_stage}")
    _check(d.offload_optimizer in ("none", "cpu"), "parallel.deepspeed.offload_optimizer",
           f"must be none|cpu, got {d.offload_optimizer!r}")
    _check(not cfg.optim.bf16_moments, "optim.bf16_moments",
           "DeepSpeed keeps its own fp32 AdamW state; set optim.bf16_moments=false or parallel.data_parallel=fsdp")
    _check(cfg.train.precision != "fp8", "train.precision",
           "fp8 is not built with parallel.data_parallel=deepspeed; use bf16/fp32 or data_parallel=fsdp")


def _validate_eval(cfg: "Config") -> None:
    """eval.*: sources of data.sources' schema, a held-out share that matches training's for a shared path."""
    e = cfg.eval
    _check(e.interval >= 0, "eval.interval", f"must be >= 0 (0 = no evaluation), got {e.interval}")
    _check(e.tokens > 0, "eval.tokens", f"must be > 0, got {e.tokens}")
    if e.interval and not e.sources:
        raise ConfigError(f"eval.sources: eval.interval={e.interval} needs at least one source "
                          "({path, weight, text_field, holdout}); or set eval.interval=0")
    if not e.sources:
        return
    try:
        DataConfig(sources=e.sources).validate()
    except ValueError as err:
        raise ConfigError(str(err).replace("data.sources", "eval.sources", 1)) from None
    if not e.interval:  # evaluation off: its sources read nothing, so they cannot overlap training
        return
    train_holdout = {src.path: src.holdout for src in cfg.data.sources}
    for i, src in enumerate(e.sources):
        if src.path in train_holdout and train_holdout[src.path] != src.holdout:
            raise ConfigError(
                f"eval.sources[{i}].holdout: {src.holdout} differs from data.sources' {train_holdout[src.path]} for "
                f"{src.path!r}; the same share must be held out on both sides, or validation reads training files"
            )


def _validate_layout_and_launch(cfg: "Config") -> None:
    """Static checks that need no process group: layouts that cannot divide whatever the world size,
    and values that would only fail deep inside a run. Each message names the key and the fix."""
    import math

    m, p, t, o = cfg.model, cfg.parallel, cfg.train, cfg.optim
    _check(math.isfinite(o.lr), "optim.lr", f"must be a finite number, got {o.lr}")
    _check(m.first_k_dense_replace >= 0, "model.first_k_dense_replace",
           f"must be >= 0 (the number of leading dense layers), got {m.first_k_dense_replace}")
    _check(m.n_shared_experts >= 0, "model.n_shared_experts", f"must be >= 0, got {m.n_shared_experts}")
    _check(m.routed_scaling_factor > 0, "model.routed_scaling_factor",
           f"must be > 0 (it scales the routed experts' gates; V3 uses 2.5), got {m.routed_scaling_factor}")
    if m.rope_scaling is not None:
        _check(m.rope_scaling.factor >= 1, "model.rope_scaling.factor",
               f"must be >= 1 (YaRN extends the context), got {m.rope_scaling.factor}; or set model.rope_scaling=null")
    if cfg.data.tokenizer is None:  # the BPE trained on first use has data.tokenizer_vocab_size tokens
        _check(cfg.data.tokenizer_vocab_size <= m.vocab_size, "model.vocab_size",
               f"{m.vocab_size} is smaller than data.tokenizer_vocab_size={cfg.data.tokenizer_vocab_size}; "
               "raise model.vocab_size or lower data.tokenizer_vocab_size")
    try:  # the layout rules that hold whatever the number of processes
        layout.check_expert_parallel(p, m)
        layout.check_node_limited(p, m)
        layout.check_tensor_parallel(p, m)
        layout.check_sequence_length(p, t.seq_len)
        layout.schedule_name(p)
        if p.data_parallel == "deepspeed":
            layout.check_deepspeed(p)
        if p.pp > 1:
            layout.split_layers(p, m)
            layout.check_microbatches(p, t.grad_accum_steps, key="train.grad_accum_steps")
    except layout.LayoutError as e:
        raise ConfigError(str(e)) from None
    _check(cfg.log.wandb_mode in (None, "online", "offline", "disabled", "shared"), "log.wandb_mode",
           f"must be online|offline|disabled (or null: WANDB_MODE, else online with an API key), "
           f"got {cfg.log.wandb_mode!r}")
    _check(bool(str(cfg.run.dir).strip()), "run.dir", "must be a directory path (the run's outputs and checkpoints)")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def load_config(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = (),
                world_size: Optional[int] = None) -> Config:
    """Schema <- YAML file <- dotlist overrides, validated (`world_size` resolves dp_shard auto:
    Config.validate). Errors name the offending key."""
    schema = OmegaConf.structured(Config)
    try:
        layers: list[Any] = [schema]
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file not found: {path}")
            layers.append(OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        OmegaConf.resolve(merged)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{key}: {_first_line(e)}{_schema_hint(e, key)}") from None
    cfg.validate(world_size)
    return cfg


def _schema_hint(e: Exception, key: str) -> str:
    """The fix for a schema error: the keys that exist, or the type the key expects."""
    import dataclasses
    import typing

    msg = str(e)
    if " not in '" in msg and "Did you mean" not in msg:
        obj = getattr(e, "object_type", None)
        if dataclasses.is_dataclass(obj):
            return f"; valid keys here: {', '.join(f.name for f in dataclasses.fields(obj))}"
        return ""
    node: Any = Config
    for part in key.split("."):
        if not (isinstance(node, type) and dataclasses.is_dataclass(node)):
            return ""
        hints = typing.get_type_hints(node)
        if part not in hints:
            return ""
        node = hints[part]
    args = [a for a in typing.get_args(node) if a is not type(None)]
    name = getattr(node, "__name__", None) if not args or typing.get_origin(node) is list else args[0].__name__
    if typing.get_origin(node) is list:
        return "; expected a list, e.g. [a, b]"
    nice = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
    return f"; expected {nice.get(name, name)}" + (" or null" if type(None) in typing.get_args(node) else "")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (saved in every run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
