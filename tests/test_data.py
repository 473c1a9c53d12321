"""The natural-instructions loader on the shipped SuperNI data and on broken inputs."""

import json

import pytest

from badit_exp.compose import compose
from badit_exp.data import DataError, load_task, resolve_task_names
from badit_exp.data.prompts import build_prompt, choose_reference, collate_train, tokenize_task

SUPERNI_TASKS = list(compose([]).data.tasks)  # the one task list: conf/data/superni.yaml

SIZES = {"task181_outcome_extraction": (338, 43), "task1572_samsum_summary": (160, 20),
         "task639_multi_woz_user_utterance_generation": (142, 18),
         "task1590_diplomacy_text_generation": (126, 16),
         "task073_commonsenseqa_answer_generation": (975, 100)}


@pytest.mark.parametrize("task", SUPERNI_TASKS)
def test_superni_tasks_load(superni, task):
    tr = load_task(superni, task, "train", drop_empty=False)
    te = load_task(superni, task, "test")
    assert (len(tr.instances), len(te.instances)) == SIZES.get(task, (1000, 100))
    assert tr.definition and all(i.outputs and all(isinstance(o, str) for o in i.outputs)
                                 for i in tr.instances)


def test_empty_references_dropped_with_cap_still_met(superni):
    t = load_task(superni, "task511_reddit_tifu_long_text_summarization", "train")
    assert len(t.instances) == 994 and all(any(o.strip() for o in i.outputs) for i in t.instances)
    assert len(load_task(superni, "task511_reddit_tifu_long_text_summarization", "train", 100).instances) == 100


def test_bare_string_outputs_become_lists(superni):
    t = load_task(superni, "task363_sst2_polarity_classification", "train", 5)
    assert len(t.instances) == 5
    assert all(i.outputs in (("POS",), ("NEG",)) for i in t.instances)


def test_reference_spaces_kept_for_scoring_stripped_for_training(superni):
    t = load_task(superni, "task1572_samsum_summary", "test")
    inst = next(i for i in t.instances if i.outputs[0] != i.outputs[0].strip())
    assert choose_reference(inst, seed=1) == inst.outputs[0].strip()


def test_reference_choice_reproducible_and_seeded(superni):
    t = load_task(superni, "task002_quoref_answer_generation", "train")
    multi = [i for i in t.instances if len({o.strip() for o in i.outputs}) > 1] or None
    if multi is None:
        pytest.skip("no multi-reference instance")
    picks = lambda s: [choose_reference(i, s) for i in multi]  # noqa: E731
    assert picks(1) == picks(1)
    assert all(p in [o.strip() for o in i.outputs] for p, i in zip(picks(2), multi))


def test_task_names_by_id():
    assert resolve_task_names(["591", "task073", "task363_sst2_polarity_classification"],
                              SUPERNI_TASKS, "k") == [
        "task591_sciq_answer_generation", "task073_commonsenseqa_answer_generation",
        "task363_sst2_polarity_classification"]
    with pytest.raises(DataError, match="matches no task"):
        resolve_task_names(["999"], SUPERNI_TASKS, "k")
    with pytest.raises(DataError, match="more than once"):
        resolve_task_names(["591", "591"], SUPERNI_TASKS, "k")


def _write(root, name, obj, split="train"):
    (root / name).mkdir(parents=True, exist_ok=True)
    text = obj if isinstance(obj, str) else json.dumps(obj)
    (root / name / f"{split}.json").write_text(text)


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not valid JSON"),
    ({"Definition": ["d"], "Instances": []}, "no instances"),
    ({"Definition": ["d"], "Instances": [{"id": "x", "input": "a"}]}, "has no output"),
    ({"Definition": ["d"], "Instances": [{"id": "x", "input": "a", "output": []}]}, "has no output"),
    ({"Instances": [{"id": "x", "input": "a", "output": "b"}]}, "no 'Definition'"),
])
def test_bad_files_are_named(tmp_path, content, needle):
    _write(tmp_path, "taskX", content)
    with pytest.raises(DataError, match=needle) as e:
        load_task(tmp_path, "taskX", "train")
    assert "taskX/train.json" in str(e.value)


def test_missing_root_and_unknown_task(tmp_path):
    with pytest.raises(DataError, match="data.root"):
        load_task(tmp_path / "nowhere", "t", "train")
    _write(tmp_path, "taskA", {"Definition": "d", "Instances": [{"input": "a", "output": "b"}]})
    with pytest.raises(DataError, match="unknown task 'taskB'.*taskA"):
        load_task(tmp_path, "taskB", "train")


class _Tok:
    """Character-level stand-in tokenizer: one id per character (+1 BOS)."""
    eos_token_id = 0
    name_or_path = "chars"

    def __len__(self):
        return 300

    def __call__(self, texts, add_special_tokens=True):
        pre = [1] if add_special_tokens else []
        return {"input_ids": [pre + [2 + ord(c) % 290 for c in t] for t in texts]}


def test_prompt_format():
    assert build_prompt("Define.", "x y") == (
        "Define.\n\nNow complete the following example -\nInput: x y\nOutput: ")


def test_label_masking_and_truncation(tmp_path):
    _write(tmp_path, "taskT", {"Definition": ["D"], "Instances": [
        {"id": "1", "input": "short", "output": ["ab"]},
        {"id": "2", "input": "z" * 500, "output": "abcdefghij" * 10}]})
    task = load_task(tmp_path, "taskT", "train")
    ex = tokenize_task(task, _Tok(), kind="train", max_seq_len=120, max_new_tokens=50, seed=1)
    prompt = build_prompt("D", "short")
    e0 = ex[0]
    assert e0["prompt_len"] == 1 + len(prompt)
    assert e0["input_ids"][e0["prompt_len"]:] == [2 + ord("a"), 2 + ord("b"), 0]
    e1 = ex[1]  # long prompt cut to fit, target capped at 50 tokens + EOS, never dropped
    assert len(e1["input_ids"]) == 120 and len(e1["input_ids"]) - e1["prompt_len"] == 51
    assert e1["input_ids"][-1] == 0
    # the prompt keeps its head (BOS + definition) and its tail ("Output: ")
    tail = [2 + ord(c) % 290 for c in "Output: "]
    assert e1["input_ids"][e1["prompt_len"] - len(tail): e1["prompt_len"]] == tail
    assert e1["input_ids"][:2] == [1, 2 + ord("D")]
    batch = collate_train(ex, pad_id=0)
    lab = batch["labels"]
    assert (lab[0, : e0["prompt_len"]] == -100).all() and (lab[0, len(e0["input_ids"]):] == -100).all()
    assert lab[0, e0["prompt_len"]: len(e0["input_ids"])].tolist() == [2 + ord("a"), 2 + ord("b"), 0]
    assert batch["attention_mask"][0].sum() == len(e0["input_ids"])


def test_eval_prompts_leave_room_for_generation(tmp_path):
    _write(tmp_path, "taskT", {"Definition": ["D"], "Instances": [
        {"id": "2", "input": "z" * 500, "output": "a"}]}, split="test")
    task = load_task(tmp_path, "taskT", "test")
    ex = tokenize_task(task, _Tok(), kind="eval", max_seq_len=120, max_new_tokens=50, seed=1)
    assert len(ex[0]["input_ids"]) == 70


def test_tokenisation_cache_roundtrip(tmp_path, superni):
    t = load_task(superni, "task363_sst2_polarity_classification", "train", 3)
    f = superni / "task363_sst2_polarity_classification" / "train.json"
    kw = dict(kind="train", max_seq_len=128, max_new_tokens=8, seed=1, cache_dir=tmp_path, task_file=f)
    a = tokenize_task(t, _Tok(), **kw)
    assert list(tmp_path.glob("*.arrow"))
    assert tokenize_task(t, _Tok(), **kw) == a
