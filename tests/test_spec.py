"""nbflow.spec: workflow text → WorkflowSpec, and every problem reported at its line."""
from __future__ import annotations

import json
import pickle
import re
import textwrap

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from nbflow.errors import SpecError
from nbflow.spec import SAFE_NAME, StepSpec, WorkflowSpec, load, parse

SEED = textwrap.dedent("""\
    name: data-pipeline
    version: 1.1.0
    parameters: {input_path: data/records.csv, rows: 1000000}
    defaults: {chunk_size: 10000, max_memory: 512MB, retries: 0}
    steps:
      - name: extract-data
        action: data.extract
        params: {path: "{input_path}", streaming: true}
      - name: validate-schema
        action: data.validate
        needs: [extract-data]
        params: {schema: {id: int64, amount: float64, country: string}}
      - name: transform-data
        action: data.transform_streaming   # or a user function
        needs: [validate-schema]
        params: {chunk_size: 10000, max_memory: "512MB"}
      - name: load-data
        action: data.load
        needs: [transform-data]
        params: {path: out/clean.parquet}
    """)


def parse_text(text: str, **kwargs) -> WorkflowSpec:
    return parse(textwrap.dedent(text), **kwargs)


def problems(text: str, **kwargs) -> list:
    with pytest.raises(SpecError) as info:
        parse_text(text, **kwargs)
    return info.value.problems


def one_problem(text: str, **kwargs):
    found = problems(text, **kwargs)
    assert len(found) == 1, [p.format() for p in found]
    return found[0]


def step_text(*lines: str, head: str = "name: wf\n") -> str:
    """A one-step workflow; the step's extra lines start at line 5."""
    body = "".join(f"    {line}\n" for line in lines)
    return f"{head}steps:\n  - name: a\n    action: act\n{body}"


# ---------------------------------------------------------------- the happy path

def test_seed_example_parses_into_the_right_steps():
    spec = parse(SEED, filename="pipeline.yaml")
    budget = 512_000_000
    assert spec.name == "data-pipeline" and spec.version == "1.1.0" and spec.filename == "pipeline.yaml"
    assert spec.parameters == {"input_path": "data/records.csv", "rows": 1_000_000}
    assert spec.defaults == {"chunk_size": 10000, "max_memory": budget, "retries": 0}
    assert spec.text == SEED
    assert spec.steps == (
        StepSpec("extract-data", "data.extract", (), {"path": "data/records.csv"},
                 chunk_size=10000, max_memory=budget, streaming=True, line=6),
        StepSpec("validate-schema", "data.validate", ("extract-data",),
                 {"schema": {"id": "int64", "amount": "float64", "country": "string"}},
                 chunk_size=10000, max_memory=budget, line=9),
        StepSpec("transform-data", "data.transform_streaming", ("validate-schema",), {},
                 chunk_size=10000, max_memory=budget, line=13),
        StepSpec("load-data", "data.load", ("transform-data",), {"path": "out/clean.parquet"},
                 chunk_size=10000, max_memory=budget, line=17),
    )
    assert spec.step("transform-data").lines == {
        "name": 13, "action": 14, "needs": 15, "params": 16, "params.chunk_size": 16, "params.max_memory": 16}
    assert spec.step_names == ("extract-data", "validate-schema", "transform-data", "load-data")


def test_lines_map_every_field_exactly():
    text = textwrap.dedent("""\
        name: wf
        steps:
          - name: first
            action: act
          - action: act
            name: second
            needs:
              - first
            retries: 2
            params:
              path: x.csv
              nested:
                deep: 1
              chunk_size: auto
            max_memory: 1GB
        """)
    step = parse(text).step("second")
    assert step.line == 5
    assert step.lines == {"action": 5, "name": 6, "needs": 7, "retries": 9, "params": 10, "params.path": 11,
                          "params.nested": 12, "params.chunk_size": 14, "max_memory": 15}
    source = text.splitlines()
    for key, line in step.lines.items():  # what later code relies on to edit the text
        assert source[line - 1].lstrip(" -").startswith(key.split(".")[-1] + ":"), key


def test_values_have_the_types_safe_load_gives():
    text = step_text("params:", *(f"  {line}" for line in [
        "hex: 0x1F", "sci: 1.5e3", "inf: .inf", "tilde: ~", "yes_: yes", "date: 2024-01-31",
        "quoted: '12'", "flow: [1, two, {three: 3.0}]", "multi: |", "  line one", "  line two"]))
    expected = yaml.safe_load(textwrap.dedent(text))["steps"][0]["params"]
    params = parse(text).steps[0].params
    assert params == expected
    assert [type(v) for v in params.values()] == [type(v) for v in expected.values()]


def test_merge_keys_and_aliases_work_like_safe_load():
    spec = parse_text("""\
        name: wf
        defaults: &base {retries: 1}
        steps:
          - name: a
            action: act
            params:
              <<: *base
              retries: 3
              keep: 1
        """)
    assert spec.steps[0].retries == 3 and spec.steps[0].params == {"keep": 1}


def test_optional_keys_and_version_forms():
    spec = parse_text(step_text(head="name: wf\nversion: 1.10\ndescription: does things\n"))
    assert (spec.version, spec.description) == ("1.10", "does things")  # as written, not float("1.10")
    assert parse_text(step_text(head="name: wf\nversion: 1.1\n")).version == "1.1"
    assert parse_text(step_text(head="name: wf\nversion: 2\n")).version == "2"
    bare = parse_text(step_text())
    assert (bare.version, bare.description, bare.parameters, bare.defaults) == (None, None, {}, {})
    assert bare.steps[0] == StepSpec("a", "act", line=3)  # engine defaults everywhere


def test_needs_accepts_one_name_or_a_list():
    spec = parse_text("""\
        name: wf
        steps:
          - {name: a, action: act}
          - {name: b, action: act, needs: a}
          - {name: c, action: act, needs: [a, b]}
          - {name: d, action: act, needs: []}
        """)
    assert [s.needs for s in spec.steps] == [(), ("a",), ("a", "b"), ()]


# ---------------------------------------------------------------- settings

@pytest.mark.parametrize(("defaults", "params", "step", "expected"), [
    ("{}", "{}", "", None),
    ("{chunk_size: 5}", "{}", "", 5),
    ("{chunk_size: 5}", "{chunk_size: 6}", "", 6),
    ("{chunk_size: 5}", "{chunk_size: 6}", "chunk_size: 7", 7),
    ("{}", "{}", "chunk_size: 7", 7),
    ("{chunk_size: 5}", "{}", "chunk_size: auto", "auto"),
])
def test_settings_precedence_step_over_params_over_defaults(defaults, params, step, expected):
    step_ = parse_text(step_text(f"params: {params}", step, head=f"name: wf\ndefaults: {defaults}\n")).steps[0]
    assert step_.chunk_size == expected
    assert "chunk_size" not in step_.params  # moved out: it is not the action's parameter


def test_every_setting_is_moved_out_of_params():
    step = parse_text(step_text("params: {chunk_size: 10, max_memory: 1MB, streaming: false, retries: 2,"
                                " cache: false, other: 1}")).steps[0]
    assert step.params == {"other": 1}
    assert step.settings() == {"chunk_size": 10, "max_memory": 1_000_000, "streaming": False,
                               "retries": 2, "cache": False}


@pytest.mark.parametrize(("written", "nbytes"), [
    ("512MB", 512_000_000), ("2GB", 2_000_000_000), ("1.5GiB", 1_610_612_736), ("4Gi", 4 * 1024**3),
    ("512Mi", 512 * 1024**2), ("1024", 1024), ("'512 mb'", 512_000_000),
])
def test_memory_size_forms(written, nbytes):
    assert parse_text(step_text(f"max_memory: {written}")).steps[0].max_memory == nbytes


@given(st.integers(1, 10**6), st.sampled_from([("", 1), ("kB", 1000), ("MB", 1000**2), ("GB", 1000**3),
                                               ("KiB", 1024), ("Mi", 1024**2), ("GiB", 1024**3)]))
def test_memory_sizes_round_trip(number, unit):
    suffix, factor = unit
    spec = parse(step_text(f"max_memory: {number}{suffix}"))
    assert spec.steps[0].max_memory == number * factor


@pytest.mark.parametrize(("setting", "message"), [
    ("max_memory: lots", "max_memory: 'lots' is not a memory size"),
    ("max_memory: -1GB", "max_memory: '-1GB' is not a memory size"),
    ("max_memory: 0", "max_memory: 0 is not a positive number of bytes"),
    ("max_memory: 1.5", "max_memory: 1.5 is not a memory size"),
    ("max_memory: 12 parsecs", "max_memory: '12 parsecs' is not a memory size"),
    ("chunk_size: 0", "chunk_size must be a positive whole number of records or 'auto', not the number 0"),
    ("chunk_size: -5", "chunk_size must be a positive whole number of records or 'auto', not the number -5"),
    ("chunk_size: big", "chunk_size must be a positive whole number of records or 'auto', not 'big'"),
    ("chunk_size: 1.5", "chunk_size must be a positive whole number of records or 'auto', not the number 1.5"),
    ("chunk_size: true", "chunk_size must be a positive whole number of records or 'auto', not true"),
    ("chunk_size: '100'", "chunk_size must be a positive whole number of records or 'auto', not '100'"),
    ("retries: -1", "retries must be a whole number ≥ 0, not the number -1"),
    ("retries: null", "retries must be a whole number ≥ 0, not nothing (null)"),
    ("streaming: yes please", "streaming must be true or false, not 'yes please'"),
    ("cache: 1", "cache must be true or false, not the number 1"),
])
def test_bad_settings_are_reported_at_their_value(setting, message):
    problem = one_problem(step_text(setting))
    assert (problem.line, problem.column) == (5, len(setting.split(":")[0]) + 7)
    assert problem.message == message
    assert problem.hint


def test_bad_memory_hint_names_the_forms():
    problem = one_problem(step_text("params: {max_memory: lots}"))
    assert problem.line == 5
    assert problem.hint == "write e.g. 512MB, 2GB, 1.5GiB, 4Gi or a whole number of bytes"


def test_bad_setting_under_defaults_is_reported_once_at_defaults():
    text = """\
        name: wf
        defaults:
          chunk_size: nope
        steps:
          - {name: a, action: act}
          - {name: b, action: act}
        """
    problem = one_problem(text)
    assert (problem.line, problem.column) == (3, 15)


# ---------------------------------------------------------------- placeholders

def test_whole_placeholder_keeps_the_parameter_type_and_partial_ones_substitute():
    spec = parse_text("""\
        name: wf
        parameters: {rows: 1000, region: eu, flag: true}
        steps:
          - name: extract-{region}
            action: data.extract
            params:
              rows: "{rows}"
              flag: "{flag}"
              path: "data/{region}/{rows}.csv"
              format: "{0} {not a placeholder} {x-y} {"
              list: ["{rows}", "n={rows}"]
        """)
    step = spec.steps[0]
    assert step.name == "extract-eu"
    assert step.params == {"rows": 1000, "flag": True, "path": "data/eu/1000.csv",
                           "format": "{0} {not a placeholder} {x-y} {", "list": [1000, "n=1000"]}


def test_placeholders_fill_action_needs_and_settings():
    spec = parse_text("""\
        name: wf
        parameters: {fn: clean, first: load, chunk: 500, budget: 2GB}
        steps:
          - {name: load, action: act}
          - name: b
            action: "{fn}"
            needs: "{first}"
            chunk_size: "{chunk}"
            params: {max_memory: "{budget}"}
        """)
    step = spec.step("b")
    assert (step.action, step.needs, step.chunk_size, step.max_memory) == ("clean", ("load",), 500, 2 * 10**9)


def test_setting_from_a_placeholder_is_validated():
    problem = one_problem(step_text('chunk_size: "{chunk}"', head="name: wf\nparameters: {chunk: -3}\n"))
    assert problem.line == 6
    assert "not the number -3" in problem.message


def test_overrides_beat_namespace_beat_parameters():
    text = step_text('params: {a: "{a}", b: "{b}", c: "{c}", d: "{d}"}',
                     head="name: wf\nparameters: {a: 1, b: 1, c: 1}\n")
    spec = parse_text(text, namespace={"b": 2, "c": 2, "d": 2, "unused": 2}, overrides={"c": 3})
    assert spec.steps[0].params == {"a": 1, "b": 2, "c": 3, "d": 2}
    assert spec.parameters == {"a": 1, "b": 2, "c": 3, "d": 2}  # namespace's "unused" is ignored


def test_namespace_fills_declared_parameters_that_no_step_uses():
    spec = parse_text(step_text(head="name: wf\nparameters: {rows: 10}\n"), namespace={"rows": 99})
    assert spec.parameters == {"rows": 99}


def test_override_values_keep_the_callers_type():
    text = step_text('params: {n: "{n}"}', head="name: wf\nparameters: {n: 1}\n")
    assert parse_text(text, overrides={"n": 2.5}).steps[0].params == {"n": 2.5}


@given(st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.text(), st.none(),
                 st.lists(st.integers(), max_size=3)))
def test_a_lone_placeholder_takes_any_override_value_unchanged(value):
    text = step_text('params: {p: "{p}"}', head="name: wf\nparameters: {p: 0}\n")
    assert parse(text, overrides={"p": value}).steps[0].params["p"] == value


def test_unknown_placeholder_is_reported_at_its_exact_position_with_did_you_mean():
    problem = one_problem("""\
        name: wf
        parameters: {input_path: x.csv}
        steps:
          - name: a
            action: act
            params:
              path: "data/{input_pth}"
        """)
    assert (problem.line, problem.column) == (7, 19)
    assert problem.message == "unknown parameter 'input_pth' in '{input_pth}'"
    assert problem.hint == "did you mean 'input_path'?"


def test_unknown_placeholder_in_a_folded_scalar_points_at_its_own_line():
    problem = one_problem(step_text("params:", "  message: >", "    hello", "    dear {who}"))
    assert (problem.line, problem.column) == (8, 14)
    assert problem.hint == "declare it under parameters: or pass it with -p who=VALUE"


def test_unused_override_is_a_problem_with_did_you_mean():
    problem = one_problem(step_text(head="name: wf\nparameters: {input_path: x}\n"), overrides={"input_paht": "y"})
    assert problem.format() == (
        "workflow.yaml: parameter 'input_paht' is not used by the workflow — declare it under parameters: "
        "or write {input_paht} where it goes (did you mean 'input_path'?)")


def test_override_of_a_placeholder_only_name_is_used():
    spec = parse_text(step_text('params: {p: "{region}"}'), overrides={"region": "eu"})
    assert spec.steps[0].params == {"p": "eu"} and spec.parameters == {"region": "eu"}


def test_unquoted_placeholder_is_reported_as_a_yaml_mapping():
    problem = one_problem(step_text("params: {path: {input_path}}", head="name: wf\nparameters: {input_path: x}\n"))
    assert (problem.line, problem.column) == (6, 20)
    assert problem.hint == 'quote it: "{input_path}"'


# ---------------------------------------------------------------- problems, each at its line

def test_yaml_syntax_error_has_its_position_and_a_caret_excerpt():
    with pytest.raises(SpecError) as info:
        parse("name: wf\nsteps:\n  - name: x\n    action: y: z\n")
    err = info.value
    [problem] = err.problems
    assert (problem.line, problem.column) == (4, 14)
    assert problem.message == "invalid YAML: mapping values are not allowed here"
    assert err.excerpt == "    4 |     action: y: z\n      |              ^"
    assert str(err).endswith(err.excerpt)


def test_tab_indentation_gets_a_tab_hint():
    with pytest.raises(SpecError) as info:
        parse("name: wf\nsteps:\n  - name: x\n\taction: y\n")
    assert info.value.problems[0].line == 4
    assert info.value.problems[0].hint == "indent with spaces, not tabs"


@pytest.mark.parametrize(("text", "message", "line"), [
    ("", "the workflow is empty", 1),
    ("# only a comment\n", "the workflow is empty", 1),
    ("\n- a\n- b\n", "the workflow is a list, not a mapping", 2),
    ("just text\n", "the workflow is 'just text', not a mapping", 1),
])
def test_document_must_be_a_mapping(text, message, line):
    problem = one_problem(text)
    assert (problem.message, problem.line) == (message, line)


def test_unknown_top_level_key_suggests_and_does_not_also_say_missing():
    found = problems("""\
        name: wf
        stpes:
          - {name: a, action: act}
        colour: blue
        """)
    assert [(p.line, p.message, p.hint) for p in found] == [
        (2, "unknown key 'stpes'", "did you mean 'steps'?"),
        (4, "unknown key 'colour'",
         "the workflow's keys are name, version, description, parameters, defaults, steps"),
    ]


def test_missing_name_and_steps():
    found = problems("version: '1'\n")
    assert [p.message for p in found] == ["the workflow has no name:", "the workflow has no steps:"]


@pytest.mark.parametrize("steps", ["steps: []", "steps:", "steps: null"])
def test_empty_steps(steps):
    problem = one_problem(f"name: wf\n{steps}\n")
    assert (problem.line, problem.message) == (2, "the workflow has no steps")


@pytest.mark.parametrize(("text", "message", "line"), [
    ("name: [a]\nsteps: [{name: a, action: b}]\n", "name must be text, not a list", 1),
    ("name: wf\nversion: [1]\nsteps: [{name: a, action: b}]\n", "version must be text, not a list", 2),
    ("name: wf\nsteps: {name: a}\n", "steps must be a list of steps, not a mapping", 2),
    ("name: wf\nsteps:\n  - just-a-name\n", "a step must be a mapping with name: and action:, not 'just-a-name'", 3),
    ("name: wf\nparameters: [a]\nsteps: [{name: a, action: b}]\n", "parameters must be a mapping, not a list", 2),
    ("name: wf\ndefaults: 5\nsteps: [{name: a, action: b}]\n", "defaults must be a mapping, not the number 5", 2),
])
def test_wrong_types_at_the_top(text, message, line):
    problem = one_problem(text)
    assert (problem.message, problem.line) == (message, line)


@pytest.mark.parametrize(("extra", "message"), [
    ("needs: 5", "step 'a': needs must name steps, not the number 5"),
    ("params: [1, 2]", "params must be a mapping, not a list"),
    ("params: text", "params must be a mapping, not 'text'"),
    ("params: {[x]: 1}", "a key must be a plain value, not a list or mapping"),
])
def test_wrong_types_in_a_step(extra, message):
    problem = one_problem(step_text(extra))
    assert (problem.message, problem.line) == (message, 5)


def test_needs_entry_of_the_wrong_type_is_pointed_at():
    problem = one_problem(step_text("needs:", "  - [b]"))
    assert (problem.line, problem.column, problem.message) == (6, 9, "step 'a': needs must name steps, not a list")


def test_unknown_step_key_suggests():
    problem = one_problem(step_text("chunksize: 10"))
    assert (problem.line, problem.column) == (5, 5)
    assert problem.message == "step 'a' has unknown key 'chunksize'"
    assert problem.hint == "did you mean 'chunk_size'?"


def test_unknown_defaults_key_suggests_or_lists_the_settings():
    found = problems("name: wf\ndefaults: {chunk_sise: 5, needs: [a]}\nsteps: [{name: a, action: b}]\n")
    assert [(p.line, p.message, p.hint) for p in found] == [
        (2, "unknown key 'chunk_sise' under defaults:", "did you mean 'chunk_size'?"),
        (2, "unknown key 'needs' under defaults:",
         "defaults: holds execution settings only: chunk_size, max_memory, streaming, retries, cache"),
    ]


def test_missing_step_name_and_action():
    found = problems("name: wf\nsteps:\n  - needs: []\n  - name: b\n")
    assert [(p.line, p.message) for p in found] == [
        (3, "the step at line 3 has no name"), (3, "the step at line 3 has no action"),
        (4, "step 'b' has no action")]


@pytest.mark.parametrize(("name", "safe"), [
    ("load data", "load-data"), ("a/b", "a-b"), ("../x", "x"), ("ünïcode", "unicode"), ("Étape 1", "Etape-1"),
    ("数据", "step"), ("", "step"), ("a.b", "a-b")])
def test_step_names_must_be_safe_folder_names(name, safe):
    problem = one_problem(f"name: wf\nsteps:\n  - name: {json.dumps(name)}\n    action: act\n")
    assert (problem.line, problem.column) == (3, 11)
    assert problem.message == f"step name '{name}' can't name its checkpoint folder"
    assert problem.hint == f"use only letters, digits, '-' and '_', e.g. '{safe}'"


@given(st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF, blacklist_categories=("Cs", "Cc")),
               max_size=12))
def test_a_step_name_is_accepted_iff_it_is_a_safe_file_name(name):
    text = f"name: wf\nsteps:\n  - name: {json.dumps(name)}\n    action: act\n"
    safe = re.fullmatch(r"[A-Za-z0-9_-]+", name) is not None
    try:
        spec = parse(text)
    except SpecError as err:
        assert not safe
        assert [p.message for p in err.problems] == [f"step name '{name}' can't name its checkpoint folder"]
    else:
        assert safe and spec.steps[0].name == name
    assert (SAFE_NAME.fullmatch(name) is not None) == safe


def test_step_name_must_be_text():
    problem = one_problem("name: wf\nsteps:\n  - name: 2024\n    action: act\n")
    assert problem.message == "the step at line 3: name must be text, not the number 2024"
    assert problem.hint == 'quote it: name: "2024"'


def test_duplicate_step_name_says_where_the_first_is():
    problem = one_problem("""\
        name: wf
        steps:
          - name: a
            action: act
          - name: b
            action: act
          - name: a
            action: act
        """)
    assert (problem.line, problem.message) == (7, "step name 'a' is used twice")
    assert problem.hint == "the first 'a' is at line 3; give each step its own name"


def test_duplicate_yaml_keys_are_reported_at_every_level():
    found = problems("""\
        name: wf
        name: wf2
        steps:
          - name: a
            action: act
            action: other
            params: {x: 1, y: 2, x: 3}
        """)
    assert [(p.line, p.column, p.message, p.hint) for p in found] == [
        (2, 1, "duplicate key 'name'", "'name' is already set at line 1; keep one (YAML keeps only the last)"),
        (6, 5, "duplicate key 'action'", "'action' is already set at line 5; keep one (YAML keeps only the last)"),
        (7, 26, "duplicate key 'x'", "'x' is already set at line 7; keep one (YAML keeps only the last)"),
    ]


def test_unknown_needs_suggests_a_step():
    problem = one_problem("""\
        name: wf
        steps:
          - {name: transform-data, action: act}
          - name: load-data
            action: act
            needs: [transfrom-data]
        """)
    assert (problem.line, problem.column) == (6, 13)
    assert problem.format() == ("workflow.yaml, line 6, column 13: step 'load-data' needs 'transfrom-data', "
                                "which is not a step — did you mean 'transform-data'?")


def test_unknown_needs_without_a_close_match_lists_the_steps():
    problem = one_problem("name: wf\nsteps:\n  - {name: a, action: x}\n  - {name: b, action: x, needs: zzz}\n")
    assert problem.hint == "the steps are 'a', 'b'"


def test_step_that_needs_itself():
    problem = one_problem(step_text("needs: [a]"))
    assert (problem.line, problem.message, problem.hint) == (5, "step 'a' needs itself", "remove 'a' from its needs")


def test_needing_a_step_twice():
    problem = one_problem("name: wf\nsteps:\n  - {name: a, action: x}\n  - {name: b, action: x, needs: [a, a]}\n")
    assert (problem.line, problem.message) == (4, "step 'b' needs 'a' twice")


def test_cycle_is_printed_in_needs_order_at_a_step_in_it():
    problem = one_problem("""\
        name: wf
        steps:
          - name: a
            action: act
            needs: [c]
          - name: b
            action: act
            needs: [a]
          - name: c
            action: act
            needs: [b]
          - name: d
            action: act
            needs: [c]
        """)
    assert problem.message == "steps need each other in a cycle: a → c → b → a"
    assert (problem.line, problem.column) == (5, 13)  # a's "needs: [c]"


def test_two_step_cycle_with_a_duplicated_name_does_not_crash():
    found = problems("""\
        name: wf
        steps:
          - {name: a, action: x}
          - {name: b, action: x, needs: a}
          - {name: a, action: x, needs: b}
        """)
    assert [p.message for p in found] == ["step name 'a' is used twice",
                                          "steps need each other in a cycle: a → b → a"]
    assert found[1].line == 5


def test_unknown_action_uses_action_check_suggestions():
    seen = []

    def check(name):
        seen.append(name)
        return None if name == "data.extract" else ["data.extract"] if name == "data.extarct" else []

    found = problems("""\
        name: wf
        steps:
          - {name: a, action: data.extract}
          - {name: b, action: data.extarct}
          - {name: c, action: nothing_like_it}
        """, action_check=check)
    assert seen == ["data.extract", "data.extarct", "nothing_like_it"]
    assert [(p.line, p.message) for p in found] == [
        (4, "step 'b': unknown action 'data.extarct'"), (5, "step 'c': unknown action 'nothing_like_it'")]
    assert found[0].hint == "did you mean 'data.extract'?"
    assert "@nbflow.action" in found[1].hint and "package.module:function" in found[1].hint


def test_unsafe_yaml_tags_are_refused_not_run():
    problem = one_problem(step_text("params: {cmd: !!python/object/apply:os.system [echo hi]}"))
    assert problem.line == 5 and problem.message.startswith("invalid value: could not determine a constructor")


def test_every_problem_is_reported_in_one_error():
    text = textwrap.dedent("""\
        name: wf
        nme: again
        parameters: {input_path: a.csv}
        defaults: {max_memory: lots}
        steps:
          - name: a b
            action: act
            params: {path: "{input_pth}", chunk_size: 0}
            retries: -1
          - name: c
            acton: x
            needs: [zz]
        """)
    with pytest.raises(SpecError) as info:
        parse(text, filename="flow.yaml", overrides={"rowz": 1})
    err = info.value
    assert [p.line for p in err.problems] == [None, 2, 4, 6, 8, 8, 9, 10, 11, 12]
    message = str(err)
    assert message.startswith("10 problems in flow.yaml:\n  flow.yaml: parameter 'rowz' is not used")
    assert "\n  flow.yaml, line 12, column 13: step 'c' needs 'zz', which is not a step" in message
    assert pickle.loads(pickle.dumps(err)).problems == err.problems


def test_load_reads_a_file_and_names_it(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(SEED, encoding="utf-8")
    spec = load(path, {"rows": 5})
    assert spec.filename == "pipeline.yaml" and spec.parameters["rows"] == 5
    path.write_text("name: wf\nsteps: []\n", encoding="utf-8")
    with pytest.raises(SpecError, match=r"^pipeline\.yaml, line 2, column 1: the workflow has no steps"):
        load(path)
    with pytest.raises(SpecError, match="no such file"):
        load(tmp_path / "missing.yaml")


def test_unknown_placeholder_in_an_action_is_not_also_an_unknown_action():
    found = problems("name: wf\nsteps:\n  - name: a\n    action: '{fn}'\n", action_check=lambda name: [])
    assert [p.message for p in found] == ["unknown parameter 'fn' in '{fn}'"]


def test_recursive_alias_is_a_problem_not_a_crash():
    problem = one_problem(step_text("params: &p", "  x: [*p]"))
    assert problem.line == 6 and problem.message.startswith("invalid value")


@given(st.lists(st.tuples(st.integers(0, len(SEED)), st.sampled_from(list("{}[]:-,&*!|'\"# \n\tab0.~"))),
                min_size=1, max_size=6))
def test_any_edit_of_a_workflow_parses_or_raises_spec_error(edits):
    text = SEED
    for position, char in edits:
        text = text[:position] + char + text[position + 1:]
    try:
        parse(text, overrides={"rows": 3}, action_check=lambda name: None)
    except SpecError as err:  # never a KeyError, TypeError or RecursionError from a typo
        assert err.problems and str(err)


def test_params_are_checked_against_their_actions_before_anything_runs():
    from nbflow.plan import make_plan

    def tag(df, factor, label="x"):
        return df

    def anything(df, **options):
        return df

    spec = parse(textwrap.dedent("""\
        name: wf
        steps:
          - name: read
            action: data.extract
            params: {pth: data.csv, sep: ";"}
          - name: check
            action: data.validate
            needs: read
            params: {schema: {id: int64}, strict: true}
          - name: tagged
            action: tag
            needs: check
            params: {factr: 2}
          - name: free
            action: anything
            needs: tagged
            params: {whatever: 1}
          - name: apply
            action: data.transform
            needs: free
            params: {function: tag, factor: 2, colour: red}
          - name: save
            action: data.load
            needs: apply
            params:
              path: out/x.parquet
              compresion: zstd
              row_group_size: 1000
          - name: nowhere
            action: data.load
            needs: apply
            params: {path: ""}
        """))
    with pytest.raises(SpecError) as info:
        make_plan(spec, namespace={"tag": tag, "anything": anything})
    found = [(p.line, p.message, p.hint) for p in info.value.problems]
    assert found == [
        (5, "step 'read': data.extract needs the parameter 'path'", "did you mean 'path' where it says 'pth'?"),
        (9, "step 'check': data.validate has no parameter 'strict'", "it takes schema"),
        (13, "step 'tagged': tag needs the parameter 'factor'", "did you mean 'factor' where it says 'factr'?"),
        (13, "step 'tagged': tag has no parameter 'factr'", "did you mean 'factor'?"),
        (21, "step 'apply': tag has no parameter 'colour'", "it takes factor, label"),
        (27, "step 'save': data.load has no parameter 'compresion'",
         "did you mean 'compression' or 'compression_level'?"),
        (32, "step 'nowhere': data.load: path is empty", "e.g. path: out/clean.parquet"),
    ]
    assert "workflow.yaml, line 5: step 'read'" in str(info.value)


def test_a_schema_is_checked_when_the_workflow_is_planned():
    from nbflow.plan import make_plan

    spec = parse(textwrap.dedent("""\
        name: wf
        steps:
          - {name: read, action: data.extract, params: {path: data.csv}}
          - name: check
            action: data.validate
            needs: read
            params:
              schema: {id: integer, amount: {dtype: float64, nulable: true}, note: {dtype: string, required: "no"}}
          - {name: listed, action: data.validate, needs: read, params: {schema: [id, amount]}}
        """))
    with pytest.raises(SpecError) as info:
        make_plan(spec)
    assert [(p.line, p.message, p.hint) for p in info.value.problems] == [
        (8, "step 'check': data.validate: column 'id' has dtype 'integer'", "did you mean 'int'?"),
        (8, "step 'check': data.validate: column 'amount' has unknown key 'nulable'", "did you mean 'nullable'?"),
        (8, "step 'check': data.validate: column 'note': required must be true or false, not 'no'",
         "write required: true or required: false"),
        (9, "step 'listed': data.validate: schema must map column names to dtypes",
         "e.g. schema: {id: int64, amount: {dtype: float64, nullable: true}}"),
    ]


def test_a_read_option_spelt_another_way_is_pointed_at_pandas_name():
    from nbflow.plan import make_plan

    spec = parse("name: wf\nsteps:\n  - name: read\n    action: data.extract\n"
                 "    params: {path: x.csv, seperator: ';', dtype: {id: int64}}\n")
    with pytest.raises(SpecError) as info:
        make_plan(spec)
    [problem] = info.value.problems
    assert (problem.line, problem.message, problem.hint) == (
        5, "step 'read': data.extract has no parameter 'seperator'", "did you mean 'sep'?")


def test_two_loads_writing_one_path_are_refused(tmp_path):
    from nbflow.plan import make_plan

    spec = parse(textwrap.dedent("""\
        name: wf
        steps:
          - {name: read, action: data.extract, params: {path: x.csv}}
          - {name: save, action: data.load, needs: read, params: {path: out/x.parquet}}
          - {name: again, action: data.load, needs: read, params: {path: ./out/../out/x.parquet}}
          - {name: other, action: data.load, needs: read, params: {path: out/y.parquet}}
        """))
    with pytest.raises(SpecError) as info:
        make_plan(spec, workdir=tmp_path)
    [problem] = info.value.problems
    assert (problem.line, problem.message) == (5, "steps 'save' and 'again' both write './out/../out/x.parquet'")
    assert problem.hint.endswith("give 'again' its own path, e.g. path: out/again.parquet")
