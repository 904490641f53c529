"""Packaging: what the wheel / sdist carry for the native build on first use, the requirements, the
native build's one-line failure reasons, and the `stattn` command's doctor / --version / bench."""
import json
import os
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest

from stattn import __version__, cli, doctor, native

REPO = Path(__file__).resolve().parent.parent
CSRC = sorted(p for p in (REPO / "csrc").iterdir() if p.suffix in (".cpp", ".h"))


def _setup(*args, cwd=REPO):
    # CXX unset to a missing compiler: these commands compile nothing, and must not try to
    env = {**os.environ, "CXX": "/nonexistent/c++"}
    out = subprocess.run([sys.executable, str(REPO / "setup.py"), "-q", *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """setup.py's build_py (what a wheel holds, without compiling), egg_info and sdist outputs."""
    root = tmp_path_factory.mktemp("built")
    _setup("build_py", "-d", str(root / "lib"))
    _setup("egg_info", "-e", str(root))
    _setup("sdist", "-d", str(root / "sdist"))
    return root


def test_wheel_ships_the_csrc_sources_and_native_finds_them(built):
    packaged = built / "lib" / "stattn" / "csrc"
    assert CSRC and sorted(p.name for p in packaged.iterdir()) == [p.name for p in CSRC]
    for src in CSRC:
        assert (packaged / src.name).read_bytes() == src.read_bytes()
    # native.py's lookup as installed: the packaged copy first, even where a checkout's csrc/ exists
    assert native.source_dir([packaged, REPO / "csrc"]) == packaged
    assert native.source_dir([built / "lib" / "stattn" / "nothing", packaged]) == packaged
    assert native.source_dir() in (native._PACKAGED_CSRC, native._REPO_CSRC)


def test_sdist_carries_what_the_build_needs(built):
    (sdist,) = (built / "sdist").glob("stattn-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        for src in CSRC:
            assert tar.extractfile(f"stattn-{__version__}/csrc/{src.name}").read() == src.read_bytes()
    assert {"setup.py", "MANIFEST.in", "README.md", "stattn/native.py", "stattn/data/tokenizer"} <= names
    assert not any(n.endswith(".so") for n in names)


def test_requirements_pull_no_torch_or_numpy_pin(built):
    """torch>=2.11, the oldest tested (an installed CPU or CUDA torch satisfies it: nothing else is
    pulled), ninja for the build on first use, numpy < 2.4 only in the test extra (the Triton 3.6
    interpreter), scipy in the test and eval extras."""
    (egg,) = built.glob("*.egg-info")
    base, _, extras = (egg / "requires.txt").read_text().partition("\n[")
    base = base.split()
    assert "torch>=2.11" in base and "ninja" in base and "numpy" in base
    assert {"triton>=3.6", "diffusers>=0.42", "transformers>=5.17"} <= set(base)
    assert not any(r.startswith(("torch<", "torch=", "numpy<", "numpy=")) for r in base)
    sections = {block.split("]", 1)[0]: block.split("]", 1)[1].split() for block in ("[" + extras).split("[")[1:]}
    assert "numpy<2.4" in sections["test"] and "accelerate" in base
    assert "scipy" in sections["test"] and sections["eval"] == ["matplotlib", "scipy"]
    assert not any(r.startswith("numpy<") for name, reqs in sections.items() if name != "test" for r in reqs)


@pytest.mark.parametrize("case", ["no sources", "no ninja", "no compiler"])
def test_build_on_first_use_fails_with_one_line_saying_how_to_fix(case, monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setattr(native, "_state", {})
    if case == "no sources":
        monkeypatch.setattr(native, "_PACKAGED_CSRC", tmp_path / "a")
        monkeypatch.setattr(native, "_REPO_CSRC", tmp_path / "b")
        fix = "reinstall stattn"
    elif case == "no ninja":
        monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
        fix = "pip install ninja"
    else:
        monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)
        monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
        fix = "no C++ compiler"
    assert native._jit_build() is False
    assert fix in native._state["error"]
    native._state["ok"] = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.available() is False
        assert native.available() is False          # once
    (w,) = caught
    message = str(w.message)
    assert w.category is RuntimeWarning and "\n" not in message and fix in message and native.BUILD_HINT in message


@pytest.mark.parametrize("flags, machine, expected", [
    ("avx avx2 bmi1 bmi2 f16c fma abm movbe xsave avx512f avx512bw avx512cd avx512dq avx512vl", "x86_64", "AVX-512"),
    ("avx avx2 bmi1 bmi2 f16c fma abm movbe xsave avx512f", "x86_64", "AVX2"),
    ("sse4_2 avx", "x86_64", "baseline x86-64"),
    ("", "aarch64", "compiler default"),
])
def test_native_isa_follows_the_cpu_flags(flags, machine, expected):
    assert expected in doctor.native_isa(frozenset(flags.split()), machine)


def test_native_isa_respects_stattn_native_v4(monkeypatch):
    monkeypatch.setenv("STATTN_NATIVE_V4", "0")
    all_flags = frozenset("avx avx2 bmi1 bmi2 f16c fma abm movbe xsave avx512f avx512bw avx512cd avx512dq avx512vl"
                          .split())
    assert doctor.native_isa(all_flags, "x86_64").startswith("AVX2")


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"stattn {__version__}"


def test_doctor_reports_backends_and_versions(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    ok = native.load()
    assert f"native CPU kernels: {'available' if ok else 'unavailable'}" in out
    if not ok:
        assert native._state["error"] in out
    assert "instruction set:" in out and "Triton" in out and "CUDA" in out
    for name in ("torch", "triton", "diffusers", "transformers", "numpy", "python"):
        assert f"\n  {name}: " in out
    assert out.startswith(f"stattn {__version__}")


@pytest.mark.parametrize("suite", cli.BENCH_SUITES)
def test_bench_suites_are_reachable_and_default_to_the_cwd(suite, monkeypatch, tmp_path):
    import importlib

    module = importlib.import_module(f"stattn.bench.{suite}")
    seen = []
    monkeypatch.setattr(module, "main", lambda argv: seen.append(argv) or 0)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", suite, "--quick"]) == 0
    assert seen[-1] == ["--quick", "--out", str(tmp_path / cli.BENCH_OUT)]
    assert cli.main(["bench", suite, "--", "--out", "mine"]) == 0
    assert seen[-1] == ["--out", "mine"]                     # the user's --out is kept


def test_bench_native_writes_its_results_under_the_cwd(monkeypatch, tmp_path):
    """The real bench.native main, its timed cases replaced by constant rows (no benchmark runs)."""
    from stattn.bench import native as suite

    op = dict.fromkeys(("speedup_fwd", "speedup_paired_fwd", "speedup_fwdbwd", "speedup_paired_fwdbwd"), 1.0)
    loop = dict.fromkeys(("speedup_vs_eager_autograd", "speedup_paired_vs_eager_autograd", "speedup_vs_closed_form"),
                         1.0)
    monkeypatch.setattr(suite.native, "load", lambda: True)
    monkeypatch.setattr(suite, "op_case", lambda *a: dict(op))
    monkeypatch.setattr(suite, "loop_case", lambda *a: dict(loop))
    monkeypatch.setattr(suite, "markdown", lambda result: "table\n")
    monkeypatch.setattr(suite.torch, "set_num_threads", lambda n: None)
    package_results = Path(suite.__file__).resolve().parent / "results"
    before = set(package_results.glob("*")) if package_results.is_dir() else set()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench", "native", "--quick"]) == 0
    (written,) = (tmp_path / cli.BENCH_OUT).glob("native-*.json")
    assert json.loads(written.read_text())["op"][0] == op
    assert (set(package_results.glob("*")) if package_results.is_dir() else set()) == before
