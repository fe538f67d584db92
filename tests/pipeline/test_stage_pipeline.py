"""Stage and Pipeline declaration, and splitting trial configs per stage."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
from ray import tune

from eeipu_ray.errors import ConfigError, PipelineDefinitionError
from eeipu_ray.pipeline import Pipeline, Stage, StageContext


def three(inputs, params, ctx):
    return inputs


def two(inputs, params):
    return inputs


def make_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        "toy",
        [
            Stage("prep", three, {"n": tune.randint(1, 10), "mode": "fast"}),
            Stage("train", three, {"lr": tune.loguniform(1e-4, 1e-1), "opt": tune.choice(["a"])}),
            Stage("eval", two, {"k": 5}),
        ],
        **kwargs,
    )


# ------------------------------------------------------------------ Stage
class TestStageDeclaration:
    @pytest.mark.parametrize("name", ["", "1abc", "a/b", "a b", "../x", ".hidden", "ü", None, 3])
    def test_invalid_stage_name(self, name):
        with pytest.raises(PipelineDefinitionError, match=r"stage name") as info:
            Stage(name, three)
        assert repr(name) in str(info.value)

    @pytest.mark.parametrize("name", ["prep", "_p", "Stage-2.v1", "a_b-c.d"])
    def test_valid_stage_name(self, name):
        assert Stage(name, three).name == name

    @pytest.mark.parametrize("key", ["a/b", "", "1x", "a b", "../up"])
    def test_invalid_hyperparameter_name(self, key):
        with pytest.raises(PipelineDefinitionError) as info:
            Stage("prep", three, {key: tune.uniform(0, 1)})
        msg = str(info.value)
        assert "'prep'" in msg and repr(key) in msg

    def test_non_string_hyperparameter_name(self):
        with pytest.raises(PipelineDefinitionError, match=r"'prep'"):
            Stage("prep", three, {1: 2})

    def test_space_must_be_mapping(self):
        with pytest.raises(PipelineDefinitionError, match=r"'prep'.*mapping"):
            Stage("prep", three, [("n", 1)])

    def test_non_callable_fn(self):
        with pytest.raises(PipelineDefinitionError, match=r"'prep'.*not callable"):
            Stage("prep", "not a function")

    @pytest.mark.parametrize(
        "fn",
        [
            lambda: None,
            lambda x: x,
            lambda a, b, c, d: a,
            lambda a, b, *, flag: a,
        ],
        ids=["zero", "one", "four-required", "required-kwonly"],
    )
    def test_wrong_arity_names_stage(self, fn):
        with pytest.raises(PipelineDefinitionError) as info:
            Stage("train", fn)
        msg = str(info.value)
        assert "'train'" in msg and "(inputs, params" in msg

    def test_accepted_signatures(self):
        calls = []

        def with_default_ctx(inputs, params, ctx=None):
            calls.append(("default", ctx))

        def varargs(*args):
            calls.append(("varargs", len(args)))

        def extra_optional(inputs, params, ctx, extra=1):
            calls.append(("extra", extra))

        def kwonly_default(inputs, params, *, scale=2):
            calls.append(("kwonly", scale))

        class Callable3:
            def __call__(self, inputs, params, ctx):
                calls.append(("callable", ctx.stage))

        ctx = StageContext("s", 1, Path("."))
        for fn in (with_default_ctx, varargs, extra_optional, kwonly_default, Callable3()):
            Stage("s", fn).call(None, {}, ctx)
        Stage("s", functools.partial(lambda tag, i, p: calls.append((tag, p)), "partial")).call(
            None, {"a": 1}, ctx
        )
        assert calls == [
            ("default", ctx),
            ("varargs", 3),
            ("extra", 1),
            ("kwonly", 2),
            ("callable", "s"),
            ("partial", {"a": 1}),
        ]

    def test_call_passes_copy_of_params(self):
        def mutate(inputs, params):
            params["n"] = 99
            return params

        params = {"n": 1}
        out = Stage("s", mutate).call(None, params, StageContext("s", 1, Path(".")))
        assert out == {"n": 99}
        assert params == {"n": 1}

    @pytest.mark.parametrize("version", ["", 2, None])
    def test_bad_version(self, version):
        with pytest.raises(PipelineDefinitionError, match=r"version"):
            Stage("prep", three, version=version)

    @pytest.mark.parametrize("load_cost", [-1.0, math.nan, math.inf, "abc", True])
    def test_bad_load_cost(self, load_cost):
        with pytest.raises(PipelineDefinitionError, match=r"'prep'.*load_cost"):
            Stage("prep", three, load_cost=load_cost)

    def test_cost_must_be_callable(self):
        with pytest.raises(PipelineDefinitionError, match=r"'prep'.*cost"):
            Stage("prep", three, cost=3.0)

    def test_space_is_copied(self):
        space = {"n": 1}
        stage = Stage("prep", three, space)
        space["m"] = 2
        assert stage.space == {"n": 1}


class TestStageContext:
    def test_charge_validates(self, tmp_path):
        ctx = StageContext("train", 2, tmp_path)
        ctx.charge(3)
        assert ctx._charged == 3.0
        for bad in (-1, math.nan, math.inf):
            with pytest.raises(ValueError, match=r"'train'"):
                ctx.charge(bad)
        assert ctx._charged == 3.0

    def test_report_goes_to_reporter_with_stage(self, tmp_path):
        seen = []
        ctx = StageContext("train", 2, tmp_path, _reporter=seen.append)
        ctx.report(epoch=1, loss=0.5)
        assert seen == [{"stage": "train", "epoch": 1, "loss": 0.5}]
        StageContext("train", 2, tmp_path).report(epoch=1)  # no reporter: only logged


# --------------------------------------------------------------- Pipeline
class TestPipelineDeclaration:
    def test_basic_properties(self):
        p = make_pipeline()
        assert p.stage_names == ["prep", "train", "eval"]
        assert len(p) == 3
        assert set(p.search_space) == {"prep", "train", "eval"}
        assert p.search_space["eval"] == {"k": 5}
        assert "toy" in repr(p) and "train" in repr(p)

    def test_empty_pipeline(self):
        with pytest.raises(PipelineDefinitionError, match=r"'toy' has no stages"):
            Pipeline("toy", [])

    def test_duplicate_stage_names(self):
        with pytest.raises(PipelineDefinitionError, match=r"duplicate stage name 'prep'"):
            Pipeline("toy", [Stage("prep", three), Stage("train", two), Stage("prep", two)])

    @pytest.mark.parametrize("name", ["", "a/b", "../p", "two words", None])
    def test_invalid_pipeline_name(self, name):
        with pytest.raises(PipelineDefinitionError, match=r"pipeline name"):
            Pipeline(name, [Stage("prep", three)])

    def test_non_stage_item(self):
        with pytest.raises(PipelineDefinitionError, match=r"item 1 is function"):
            Pipeline("toy", [Stage("prep", three), three])

    def test_space_override_and_extension(self):
        p = make_pipeline(space={"prep": {"n": tune.randint(100, 200), "extra": 7}})
        prep = p.search_space["prep"]
        assert prep["n"].lower == 100 and prep["extra"] == 7 and prep["mode"] == "fast"
        # the stage object given to the pipeline is unchanged
        assert p.stages[1].space.keys() == {"lr", "opt"}

    def test_space_override_unknown_stage(self):
        with pytest.raises(PipelineDefinitionError, match=r"space key 'nope' belongs to no stage"):
            make_pipeline(space={"nope": {"x": 1}})

    def test_space_override_not_mapping(self):
        with pytest.raises(PipelineDefinitionError, match=r"space\['prep'\] must be a mapping"):
            make_pipeline(space={"prep": 3})
        with pytest.raises(PipelineDefinitionError, match=r"space must be a mapping"):
            make_pipeline(space=[("prep", {})])

    def test_space_override_invalid_hyperparameter(self):
        with pytest.raises(PipelineDefinitionError, match=r"'prep'.*'bad/key'"):
            make_pipeline(space={"prep": {"bad/key": 1}})


# ------------------------------------------------------------ split_config
class TestSplitConfig:
    def test_nested(self):
        p = make_pipeline()
        per_stage = p.split_config({"prep": {"n": 3}, "train": {"lr": 0.01, "opt": "a"}})
        assert per_stage == [{"n": 3, "mode": "fast"}, {"lr": 0.01, "opt": "a"}, {"k": 5}]

    def test_flat(self):
        p = make_pipeline()
        per_stage = p.split_config({"prep/n": 3, "train/lr": 0.01, "train/opt": "a"})
        assert per_stage == [{"n": 3, "mode": "fast"}, {"lr": 0.01, "opt": "a"}, {"k": 5}]

    def test_mixed_forms_and_constant_override(self):
        p = make_pipeline()
        per_stage = p.split_config(
            {"prep": {"n": 3, "mode": "slow"}, "train/lr": 0.5, "train/opt": "a", "eval/k": 1}
        )
        assert per_stage == [{"n": 3, "mode": "slow"}, {"lr": 0.5, "opt": "a"}, {"k": 1}]

    def test_nest_config(self):
        p = make_pipeline()
        assert p.nest_config({"prep/n": 2, "train/lr": 0.1, "train/opt": "a"}) == {
            "prep": {"n": 2, "mode": "fast"},
            "train": {"lr": 0.1, "opt": "a"},
            "eval": {"k": 5},
        }

    @pytest.mark.parametrize(
        "config, culprit",
        [
            ({"bogus": {"n": 1}}, "'bogus'"),
            ({"bogus/n": 1}, "'bogus'"),
            ({"prep": {"n": 1, "zzz": 2}, "train": {"lr": 0.1, "opt": "a"}}, "'zzz'"),
            ({"prep/n": 1, "prep/zzz": 2, "train/lr": 0.1, "train/opt": "a"}, "'zzz'"),
            ({"prep": {"n": 1}, "train/lr": 0.1}, "train/opt"),
            ({"train": {"lr": 0.1, "opt": "a"}}, "prep/n"),
            ({"prep": 5}, "config['prep'] must be a mapping"),
            ({3: 1}, "config key 3"),
            ({"prep/n": 1, "prep": {"n": 2}, "train/lr": 0.1, "train/opt": "a"}, "prep/n twice"),
        ],
        ids=[
            "unknown-stage-nested",
            "unknown-stage-flat",
            "unknown-hp-nested",
            "unknown-hp-flat",
            "missing-domain-train",
            "missing-domain-prep",
            "stage-not-mapping",
            "non-str-key",
            "flat-and-nested-twice",
        ],
    )
    def test_config_errors_name_culprit(self, config, culprit):
        with pytest.raises(ConfigError) as info:
            make_pipeline().split_config(config)
        assert culprit in str(info.value)

    def test_config_must_be_mapping(self):
        with pytest.raises(ConfigError, match=r"mapping"):
            make_pipeline().split_config([("prep/n", 1)])

    def test_flat_key_with_nested_slash(self):
        with pytest.raises(ConfigError, match=r"no hyperparameter 'lr/x'"):
            make_pipeline().split_config({"train/lr/x": 1})

    @pytest.mark.parametrize(
        "domain",
        [
            tune.uniform(0, 1),
            tune.quniform(0, 1, 0.1),
            tune.loguniform(1e-3, 1),
            tune.randint(0, 3),
            tune.qrandint(0, 9, 3),
            tune.choice([1, 2]),
            tune.sample_from(lambda spec: 1),
            tune.grid_search([1, 2]),
        ],
        ids=[
            "uniform",
            "quniform",
            "loguniform",
            "randint",
            "qrandint",
            "choice",
            "sample_from",
            "grid_search",
        ],
    )
    def test_every_domain_kind_is_required(self, domain):
        p = Pipeline("p", [Stage("only", two, {"x": domain, "c": 1})])
        with pytest.raises(ConfigError, match=r"only/x"):
            p.split_config({})
        assert p.split_config({"only": {"x": 0}}) == [{"x": 0, "c": 1}]

    def test_constants_only_pipeline_needs_no_config(self):
        p = Pipeline("p", [Stage("a", two, {"x": [1, 2], "y": {"z": None}}), Stage("b", two)])
        assert p.split_config({}) == [{"x": [1, 2], "y": {"z": None}}, {}]

    def test_prefix_keys_shape(self):
        p = make_pipeline()
        keys = p.prefix_keys({"prep/n": 3, "train/lr": 0.01, "train/opt": "a"})
        assert len(keys) == 3 and len(set(keys)) == 3
        # flat and nested forms of one config are one prefix
        assert keys == p.prefix_keys({"prep": {"n": 3}, "train": {"lr": 0.01, "opt": "a"}})
