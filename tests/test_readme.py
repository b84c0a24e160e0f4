"""The README's Python example runs as written, and its first screen has two commands."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
  text = README.read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "README has no python example"
  namespace = {}
  exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
  loss = float(namespace["loss"])
  assert loss > 0 and loss == loss  # a real, finite loss value


def test_readme_first_screen_has_setup_and_test_commands():
  first_screen = README.read_text()[:2500]
  bash = re.findall(r"```bash\n(.*?)```", first_screen, flags=re.S)
  commands = [line for block in bash for line in block.splitlines()
              if line.strip() and not line.startswith("#")]
  assert len(commands) == 2, commands
  assert "pip install -e ." in commands[0] and "experiments/" in commands[0]
  assert "pip install -e '.[test]'" in commands[1] and "pytest" in commands[1]


def test_readme_links_point_to_files_and_it_stays_short():
  text = README.read_text()
  links = [t for t in re.findall(r"\]\(([^)#]+)\)", text) if "://" not in t]
  assert links
  missing = [t for t in links if not (README.parent / t).exists()]
  assert not missing, missing
  assert len(text.splitlines()) <= 260
