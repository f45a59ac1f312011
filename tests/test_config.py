"""Config composition and validation (utils/config/schema.py, utils/config/validation.py): fast, no training.

Every config here is composed from the real conf/ tree with Hydra's compose API, exactly as a command
line would compose it, and then validated the way `pretrain.fit` validates it.
"""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf

from tests.conftest import CONF_DIR, compose_config
from utils.config.schema import TrainerConf
from utils.config.errors import ConfigError, from_hydra
from utils.config.validation import validate_config


def validate(*overrides: str) -> DictConfig:
    return validate_config(compose_config("run_name=test", *overrides))


def config_error(*overrides: str) -> str:
    """The error message for a config that must be rejected, while Hydra composes it (a key or type the
    typed schema refuses) or when it is validated (a `_target_` node's keys, cross-key rules)."""
    try:
        cfg = compose_config("run_name=test", *overrides)
    except ConfigCompositionException as err:
        return str(from_hydra(err))
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    return str(info.value)


def group_options() -> list[tuple[str, str]]:
    """(group, option) for every yaml file in every config group directory under conf/."""
    options = []
    for group_dir in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "shrink")):  # shrink: applied by debug modes
        for path in sorted(group_dir.rglob("*.yaml")):  # family options live in subfolders (model=reasoning/trm)
            options.append((group_dir.name, path.relative_to(group_dir).with_suffix("").as_posix()))
    return options


# ------------------------------------------------------------------------------------------ composition
def test_default_config_has_every_group() -> None:
    cfg = compose_config()
    for group in ("model", "loss", "optim", "schedule", "grad_filter", "data", "trainer", "logger", "paths"):
        assert group in cfg, f"the default config has no '{group}' group"
    assert cfg.model._target_ == "models.grokking.transformer.DecoderTransformer"
    assert cfg.optim._target_ == "torch.optim.Adam"  # the Grokfast paper's coupled-L2 setting (experiment/grokking.yaml)
    assert cfg.grad_filter._target_ == "utils.optim.grad_filters.GrokfastEMA"
    assert cfg.schedule._target_ == "utils.optim.schedules.constant"
    assert cfg.data._target_ == "dataset.grokking.modular_arithmetic.ModularArithmeticData"
    # config.yaml's own values win over the groups' (the `_self_` position in its defaults list).
    assert cfg.optim.weight_decay == 0.005
    assert cfg.trainer.monitor == "val/acc" and cfg.trainer.monitor_mode == "max"


def test_default_config_validates_to_the_typed_schema() -> None:
    cfg = validate()
    assert OmegaConf.is_struct(cfg)
    assert OmegaConf.get_type(cfg.trainer) is TrainerConf
    # Keys the yaml leaves out come from the schema's defaults.
    assert cfg.trainer.max_consecutive_nonfinite == 10
    assert cfg.trainer.max_epochs is None
    assert cfg.trainer.ema.use_for_eval is True
    assert cfg.trainer.checkpoint.resume is True


def test_group_option_list_is_complete() -> None:
    """Guards the loop below: it must actually see the options the README lists."""
    found = set(group_options())
    for expected in [("optim", "adamw"), ("optim", "sgd"), ("optim", "adam"), ("optim", "adam_atan2"),
                     ("schedule", "plateau"), ("grad_filter", "grokfast_ma"), ("experiment", "grokking"),
                     ("debug", "fast"), ("debug", "anomaly"), ("trainer", "ddp")]:
        assert expected in found


# Options that change keys of another group's option, composed with that option (the default data is the
# grokking task, which has no `tasks` for the Cogment stages to set).
COMPOSED_WITH = {
    ("curriculum", "cogment"): ["data=cogment/curriculum"],
    ("curriculum", "cogment_tiny"): ["data=cogment/curriculum"],
}


@pytest.mark.parametrize(("group", "option"), group_options(), ids=lambda v: v)
def test_every_group_option_composes_and_validates(group: str, option: str) -> None:
    cfg = validate(f"{group}={option}", *COMPOSED_WITH.get((group, option), []))
    raw = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
    if isinstance(raw, DictConfig) and "_target_" in raw:  # a target group: the option really was selected
        assert cfg[group]._target_ == raw._target_


def test_a_curriculum_with_data_it_does_not_fit_names_the_key_and_the_fix() -> None:
    message = config_error("curriculum=cogment")  # its stages set data.tasks; the default data has no tasks
    assert message.startswith("'curriculum.stages[0].data' sets data.tasks, which the data config "
                              "(dataset.grokking.modular_arithmetic.ModularArithmeticData) does not have"), message
    assert "data=..." in message and "\n" not in message, message


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
@pytest.mark.parametrize("debug", [None, *sorted(p.stem for p in (CONF_DIR / "debug").glob("*.yaml"))])
def test_experiment_with_debug_presets_validates(experiment: str, debug: str | None) -> None:
    cfg = validate(f"experiment={experiment}", *([f"debug={debug}"] if debug else []))
    if debug == "fast":
        assert cfg.trainer.max_steps == 6  # debug is applied after the experiment
    if debug == "anomaly":
        assert cfg.trainer.detect_anomaly is True


def test_experiment_run_name_needs_hydra_context() -> None:
    """Documents why the test helpers set run_name: compose() leaves HydraConfig unset."""
    cfg = compose_config("experiment=grokking")
    with pytest.raises(Exception, match="HydraConfig"):
        _ = cfg.run_name


# ------------------------------------------------------------------------- unknown keys / wrong types
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("+optim.lrr=1", "optim.lrr"),
        ("+trainer.foo=1", "trainer.foo"),
        ("+trainer.ema.decayy=0.5", "trainer.ema.decayy"),
        ("+trainer.early_stopping.patiense=3", "trainer.early_stopping.patiense"),
        ("+paths.rooot=x", "paths.rooot"),
        ("+rn_name=x", "rn_name"),
    ],
)
def test_unknown_key_in_a_schema_group_is_rejected_with_its_full_name(override: str, key: str) -> None:
    msg = config_error(override)
    assert f"'{key}'" in msg


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.max_steps=abc", "trainer.max_steps"),  # Hydra parses abc as a string
        ("trainer.ema.enabled=maybe", "trainer.ema.enabled"),
        ("optim.lr=fast", "optim.lr"),
        ("seed=one", "seed"),
        ("trainer.grad_clip=[1,2]", "trainer.grad_clip"),
    ],
)
def test_wrongly_typed_schema_value_is_rejected_with_its_full_name(override: str, key: str) -> None:
    msg = config_error(override)
    assert f"'{key}'" in msg


@pytest.mark.parametrize(
    ("override", "key", "accepted"),
    [
        ("+model.widht=3", "model.widht", ["width", "num_layers", "num_heads", "dropout"]),
        ("+data.pp=3", "data.pp", ["p", "operation", "train_fraction", "split_seed"]),
        ("+grad_filter.alhpa=0.1", "grad_filter.alhpa", ["alpha", "lamb", "components"]),
        ("+schedule.warmup=3", "schedule.warmup", ["warmup_steps"]),
        ("+loss.terms.ce.weigth=1", "loss.terms.ce.weigth", ["weight", "ignore_index"]),
        ("+evaluators.acc.topk=5", "evaluators.acc.topk", []),
    ],
)
def test_unknown_key_in_a_target_node_names_the_key_and_the_accepted_ones(
    override: str, key: str, accepted: list[str]
) -> None:
    msg = config_error(override)
    assert f"'{key}'" in msg
    assert "Accepted keys:" in msg
    listed = msg.split("Accepted keys:")[1]
    for name in accepted:
        assert name in listed


def test_unknown_key_for_a_non_default_target_uses_that_targets_signature() -> None:
    # window_size is a GrokfastMA option, not a GrokfastEMA one.
    validate("grad_filter=grokfast_ma", "grad_filter.window_size=7")
    msg = config_error("+grad_filter.window_size=7")
    assert "'grad_filter.window_size'" in msg and "utils.optim.grad_filters.GrokfastEMA" in msg


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.width=abc", "model.width"),
        ("model.dropout=high", "model.dropout"),
        ("data.p=abc", "data.p"),
        ("grad_filter.alpha=high", "grad_filter.alpha"),
        ("schedule.warmup_steps=soon", "schedule.warmup_steps"),
        ("model.num_layers=true", "model.num_layers"),  # a bool is not an int here
    ],
)
def test_wrong_literal_type_for_a_target_parameter_is_rejected(override: str, key: str) -> None:
    msg = config_error(override)
    assert f"'{key}'" in msg


def test_int_is_accepted_where_the_target_wants_a_float() -> None:
    cfg = validate("model.dropout=0", "grad_filter.lamb=2")
    assert cfg.model.dropout == 0 and cfg.grad_filter.lamb == 2


def test_unimportable_target_is_a_config_error() -> None:
    msg = config_error("model._target_=models.grokking.transformer.NoSuchModel")
    assert "model._target_" in msg


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("trainer.monitor_mode=maximum", "trainer.monitor_mode"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("trainer.precision=float32", "trainer.precision"),
        ("trainer.max_steps=0", "trainer.max_steps"),
        ("trainer.global_batch_size=-1", "trainer.global_batch_size"),
        ("trainer.checkpoint.interval=0", "trainer.checkpoint.interval"),
        ("trainer.checkpoint.writer_nice=20", "trainer.checkpoint.writer_nice"),
        ("trainer.checkpoint.writer_nice=-1", "trainer.checkpoint.writer_nice"),
    ],
)
def test_bad_trainer_values_are_rejected(override: str, key: str) -> None:
    assert key in config_error(override)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_every_documented_precision_validates(precision: str) -> None:
    assert validate(f"trainer.precision={precision}").trainer.precision == precision


def test_component_optimizer_with_its_own_schedule_validates() -> None:
    cfg = validate(
        "+optim.components.head={modules:[head],lr:0.01,"
        "schedule:{_target_:utils.optim.schedules.constant,_partial_:true,warmup_steps:0}}"
    )
    assert cfg.optim.components.head.lr == 0.01
    assert list(cfg.optim.components.head.modules) == ["head"]
    msg = config_error(
        "+optim.components.head={modules:[head],schedule:{_target_:utils.optim.schedules.constant,_partial_:true,warmup:0}}"
    )
    assert "'optim.components.head.schedule.warmup'" in msg
    assert "'optim.components.head.lrr'" in config_error("+optim.components.head={modules:[head],lrr:0.01}")


# ------------------------------------------------------------------------ README command lines
@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=grokking"],
        ["experiment=grokking", "grad_filter=none", "optim.weight_decay=0"],
        ["optim=sgd", "optim.lr=0.05", "schedule=cosine_warmup", "trainer.max_steps=2000"],
        ["trainer.nproc_per_node=2"],
        ["debug=fast"],
        ["debug=anomaly"],
        ["optim.lr=1e-3", "model.width=64"],
        ["+optim.components.head={modules:[head],lr:3e-4}", "grad_filter.components={head:null}"],
    ],
    ids=["grokking", "grokking-baseline", "sgd-cosine", "nproc", "debug-fast", "debug-anomaly", "sweep-point",
         "components"],
)
def test_readme_command_lines_compose_and_validate(overrides: list[str]) -> None:
    """Every override list the README shows (Usage, and "Several optimizers over named components")."""
    validate(*overrides)


def test_validation_does_not_modify_the_composed_config() -> None:
    cfg = compose_config("run_name=test")
    before = OmegaConf.to_yaml(cfg)
    validate_config(cfg)
    assert OmegaConf.to_yaml(cfg) == before
