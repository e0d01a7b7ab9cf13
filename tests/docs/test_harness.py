"""The executable-docs harness itself: a drifting doc fails, a malformed doc is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.harness import DocFormatError, Result, check, parse, run_sh

DOC = """# T

## Symptom A

<!-- reproduce: low-hit-rate -->
```sh
echo "hit_rate 0.12"
```
<!-- expect: hit_rate 0\\.[0-4] -->

```sh cluster
kubectl kvcache status demo
```
<!-- expect: Ready -->

### Sub

```sh
exit 3
```
<!-- expect-exit: 3 -->

## Symptom B

```sh
echo fine
```
<!-- expect-not: error -->

```yaml
spec:
  replicas: 1
```
"""


def make_doc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "doc.md"
    path.write_text(text)
    return path


def test_parse_attaches_directives_and_scopes_reproduce_to_its_section(tmp_path: Path) -> None:
    blocks = parse(make_doc(tmp_path, DOC))
    assert [(b.lang, b.tags, b.reproduce) for b in blocks] == [
        ("sh", (), "low-hit-rate"),
        ("sh", ("cluster",), "low-hit-rate"),
        ("sh", (), "low-hit-rate"),  # a ### subsection stays in the scenario
        ("sh", (), None),  # the next ## section does not
        ("yaml", (), None),
    ]
    assert blocks[0].expects == [r"hit_rate 0\.[0-4]"] and blocks[0].line == 6
    assert blocks[2].expect_exit == 3 and blocks[3].expects_not == ["error"]
    assert blocks[1].cluster and not blocks[0].cluster


def test_a_doc_that_drifts_from_the_output_fails(tmp_path: Path) -> None:
    first, _, third, fourth, _ = parse(make_doc(tmp_path, DOC))
    assert check(first, run_sh(first, tmp_path, {})) == []
    assert check(third, run_sh(third, tmp_path, {})) == []
    drifted = Result(0, "hit_rate 0.93\n")
    assert check(first, drifted) == [r"output does not match expect: hit_rate 0\.[0-4]"]
    assert check(third, Result(0, "")) == ["exit status 0, the doc expects 3"]
    assert check(fourth, Result(0, "an error\n")) == ["output matches expect-not: error"]


def test_commands_run_with_pipefail_so_a_failing_stage_fails(tmp_path: Path) -> None:
    block = parse(make_doc(tmp_path, "```sh\nfalse | cat\necho after\n```\n<!-- expect: after -->\n"))[0]
    result = run_sh(block, tmp_path, {})
    assert result.code == 1 and check(block, result)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("```python\nprint(1)\n```\n", "fence language 'python'"),
        ("```sh\necho\n", "unterminated code block"),
        ("text\n<!-- expect: x -->\n", "expect must follow a code block"),
        ("```yaml\na: 1\n```\n<!-- expect: a -->\n", "expect after a yaml block"),
    ],
)
def test_malformed_docs_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DocFormatError, match=message):
        parse(make_doc(tmp_path, text))
