"""Packaging: the RPM, the systemd units, the man pages and the bash completion.

The RPM is built once per session exactly as `make rpm` builds it (sdist by
`make dist`, rpmbuild, rpmlint), into a temporary directory, in a few seconds.
On a host without rpmbuild, `make rpm` installs it with apt-get, as `make test`
does for QEMU; the tests are skipped only when that is impossible.
"""

from __future__ import annotations

import configparser
import gzip
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNITS = os.path.join(ROOT, "contrib", "systemd")
MAN = os.path.join(ROOT, "man")
COMPLETION = os.path.join(ROOT, "contrib", "bash-completion", "vmctl")
SPEC = os.path.join(ROOT, "contrib", "rpm", "vmbridge.spec")
MAN_PAGES = {"vmctl.1": "man1", "vmbridge.conf.5": "man5", "vmbridged.8": "man8"}
MANAGER = "io.vmbridge.Manager"
VERBS = ["list", "start", "describe", "pause", "resume", "poweroff", "reboot", "terminate", "remove", "events",
         "console", "storage", "qmp", "status", "top"]


def version() -> str:
    with open(os.path.join(ROOT, "vmbridge", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "(.+)"$', f.read(), re.M).group(1)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    return subprocess.run(cmd, **kw)


def unit(path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    parser.read(path)
    return parser


# ----------------------------------------------------------------- the RPM

class Build:
    def __init__(self, tmp):
        self.tmp = tmp
        self.dist = tmp / "dist"
        self.version = version()
        self.sdist = self.dist / f"vmbridge-{self.version}.tar.gz"
        self.rpm = self.dist / f"vmbridge-{self.version}-1.noarch.rpm"
        self.srpm = self.dist / f"vmbridge-{self.version}-1.src.rpm"
        self.root = tmp / "root"  # the binary RPM's payload
        self.output = ""


@pytest.fixture(scope="session")
def build(tmp_path_factory):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    tmp = tmp_path_factory.mktemp("rpm")
    b = Build(tmp)
    missing = [t for t in ("rpmbuild", "rpmlint", "rpm2cpio") if shutil.which(t) is None]
    if missing and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        pytest.skip(f"{', '.join(missing)} missing and cannot be installed here (needs root and apt-get)")
    out = run(["make", "-C", ROOT, "--no-print-directory", "rpm", f"DIST_DIR={b.dist}",
               f"RPM_TOPDIR={tmp / 'rpmbuild'}", f"SDIST_PYTHON={sys.executable}"], timeout=600)
    b.output = out.stdout + out.stderr
    if out.returncode != 0 and any(shutil.which(t) is None for t in ("rpmbuild", "rpmlint")):
        pytest.skip(f"rpmbuild/rpmlint could not be installed:\n{b.output[-2000:]}")
    assert out.returncode == 0, f"make rpm failed:\n{b.output}"
    b.root.mkdir()
    payload = subprocess.Popen(["rpm2cpio", str(b.rpm)], stdout=subprocess.PIPE)
    subprocess.run(["cpio", "-idm", "--quiet"], stdin=payload.stdout, cwd=b.root, check=True)
    assert payload.wait() == 0
    return b


def rpm_query(b: Build, *args, package=None) -> list[str]:
    out = run(["rpm", "-qp", *args, str(package or b.rpm)], check=True)
    return out.stdout.splitlines()


def test_make_rpm_builds_source_and_binary_rpms(build):
    assert build.sdist.is_file() and build.srpm.is_file() and build.rpm.is_file()
    assert rpm_query(build, "--qf", "%{NAME} %{VERSION} %{ARCH} %{LICENSE}\n") == \
        [f"vmbridge {build.version} noarch LGPL-2.1-or-later"]
    # The SRPM carries the sdist of `make dist`, byte for byte, and the spec.
    srpm_files = rpm_query(build, "-l", package=build.srpm)
    assert sorted(srpm_files) == sorted([build.sdist.name, "vmbridge.spec"])


def test_spec_version_is_the_package_version():
    with open(SPEC, encoding="utf-8") as f:
        assert re.search(r"^Version:\s+(\S+)$", f.read(), re.M).group(1) == version()


def test_sdist_is_the_whole_source_and_nothing_else(build):
    with tarfile.open(build.sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    prefix = f"vmbridge-{build.version}/"
    with tarfile.open(build.sdist) as tar:
        assert all(n == prefix.rstrip("/") or n.startswith(prefix) for n in tar.getnames())
    tracked = run(["git", "-C", ROOT, "ls-files"]).stdout.split()
    expected = {p for p in tracked if p.startswith(("vmbridge/", "bin/", "contrib/", "man/", "tests/"))}
    expected |= {"LICENSE", "README.md", "Makefile", "MANIFEST.in", "setup.cfg", "pyproject.toml"}
    if tracked:  # in a git checkout: every source file is in the sdist
        assert expected <= names, sorted(expected - names)
    junk = [n for n in names if re.search(r"(^|/)(__pycache__|\.venv|\.cache|dist|\.git)(/|$)|\.py[co]$", n)]
    assert not junk


def test_rpm_files_land_in_place(build):
    files = set(rpm_query(build, "-l"))
    sitelib = next(f for f in files if re.fullmatch(r"/usr/lib/python3\.\d+/site-packages/vmbridge", f))
    expected = {
        "/usr/bin/vmbridged", "/usr/bin/vmctl",
        f"{sitelib}/__init__.py", f"{sitelib}/daemon.py", f"{sitelib}/systemd.py",
        f"{os.path.dirname(sitelib)}/vmbridge-{build.version}.dist-info/METADATA",
        f"{os.path.dirname(sitelib)}/vmbridge-{build.version}.dist-info/entry_points.txt",
        "/usr/lib/systemd/system/vmbridged.service", "/usr/lib/systemd/system/vmbridged.socket",
        "/usr/lib/systemd/user/vmbridged.service", "/usr/lib/systemd/user/vmbridged.socket",
        "/usr/share/bash-completion/completions/vmctl",
        "/etc/vmbridge", "/etc/vmbridge/machines",
        "/usr/share/licenses/vmbridge/LICENSE", "/usr/share/doc/vmbridge/README.md",
    }
    assert expected <= files, sorted(expected - files)
    # Every module and every varlink interface text (package data) of the tree.
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, "vmbridge")):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        rel = os.path.relpath(dirpath, os.path.join(ROOT, "vmbridge"))
        for name in filenames:
            if name.endswith((".py", ".varlink")):
                path = os.path.normpath(os.path.join(sitelib, rel, name))
                assert path in files, f"{path} is not in the RPM"
    assert any(f.startswith(f"{sitelib}/interfaces/") and f.endswith(".varlink") for f in files)
    for page, section in MAN_PAGES.items():
        assert any(re.fullmatch(rf"/usr/share/man/{section}/{re.escape(page)}(\.gz|\.bz2|\.xz|\.zst)?", f)
                   for f in files), f"{page} not in /usr/share/man/{section}"
    # Nothing anywhere else (no /usr/local, no Debian dist-packages).
    allowed = ("/usr/bin/", "/usr/lib/python3.", "/usr/lib/systemd/", "/usr/share/man/",
               "/usr/share/bash-completion/", "/usr/share/licenses/vmbridge", "/usr/share/doc/vmbridge",
               "/etc/vmbridge")
    assert not [f for f in files if not f.startswith(allowed)]
    assert not [f for f in files if "/usr/local" in f or "dist-packages" in f]


def test_rpm_modes_and_directories(build):
    modes = {}
    for line in rpm_query(build, "--qf", "[%{FILEMODES:perms} %{FILENAMES}\n]"):
        perms, name = line.split(" ", 1)
        modes[name] = perms
    assert modes["/etc/vmbridge"].startswith("d") and modes["/etc/vmbridge/machines"].startswith("d")
    assert modes["/usr/bin/vmbridged"] == modes["/usr/bin/vmctl"] == "-rwxr-xr-x"
    for name in ("/usr/lib/systemd/system/vmbridged.service", "/usr/share/bash-completion/completions/vmctl"):
        assert modes[name] == "-rw-r--r--"


def test_rpm_contents_are_the_sources(build):
    pairs = [("usr/lib/systemd/system/vmbridged.service", "vmbridged.service"),
             ("usr/lib/systemd/system/vmbridged.socket", "vmbridged.socket"),
             ("usr/lib/systemd/user/vmbridged.service", "user/vmbridged.service"),
             ("usr/lib/systemd/user/vmbridged.socket", "user/vmbridged.socket")]
    for installed, source in pairs:
        assert (build.root / installed).read_bytes() == open(os.path.join(UNITS, source), "rb").read()
    assert (build.root / "usr/share/bash-completion/completions/vmctl").read_bytes() == \
        open(COMPLETION, "rb").read()
    for page, section in MAN_PAGES.items():
        installed = next((build.root / "usr/share/man" / section).glob(page + "*"))
        data = gzip.decompress(installed.read_bytes()) if installed.suffix == ".gz" else installed.read_bytes()
        assert data == open(os.path.join(MAN, page), "rb").read()
    # The entry points are the console scripts of setup.cfg, run by the system's python3.
    for script, target in (("vmbridged", "vmbridge.daemon"), ("vmctl", "vmbridge.cli")):
        text = (build.root / "usr/bin" / script).read_text()
        assert text.startswith("#!/usr/bin/python3\n") and f"from {target} import main" in text


def test_rpm_requires(build):
    requires = set(rpm_query(build, "--requires"))
    for name in ("python3-gevent", "python3-varlink", "python3-psutil",
                 "(qemu-system-x86-core or qemu-kvm-core)"):
        assert name in requires, f"{name} not in {sorted(requires)}"
    assert any(r.startswith("python(abi) = 3.") for r in requires)
    recommends = set(rpm_query(build, "--recommends"))
    assert {"edk2-ovmf", "virtiofsd", "qemu-img"} <= recommends


def test_rpm_scriptlets_handle_both_units(build):
    scripts = "\n".join(rpm_query(build, "--scripts"))
    for phase in ("postinstall", "preuninstall", "postuninstall"):
        assert f"{phase} scriptlet" in scripts
    assert scripts.count("vmbridged.socket vmbridged.service") >= 4  # post and preun, system and user
    # Never restarted by an upgrade: that would stop every VM.
    assert "try-restart" not in scripts and "restart" not in scripts.replace("daemon-reload", "")


def test_rpmlint_reports_no_errors(build):
    config = ["-c", os.path.join(ROOT, "contrib", "rpm", "rpmlint-fedora.toml")] \
        if "--load" in build.output else []
    out = run(["rpmlint", *config, SPEC, str(build.rpm), str(build.srpm)])
    summary = re.search(r"(\d+) errors, (\d+) warnings", out.stdout)
    assert summary, out.stdout + out.stderr
    assert summary.group(1) == "0", out.stdout
    # The warnings left are documented in contrib/rpm/README.md.
    warnings = {m.group(1) for m in re.finditer(r": W: ([\w-]+)", out.stdout)}
    with open(os.path.join(ROOT, "contrib", "rpm", "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert not [w for w in warnings if w not in readme], warnings


# --------------------------------------------------------------- the units

@pytest.fixture(scope="session")
def analyze():
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return shutil.which("systemd-analyze")


@pytest.mark.parametrize("kind", ["system", "user"])
def test_units_pass_systemd_analyze_verify(build, analyze, tmp_path, kind):
    """The installed units, with ExecStart= at the RPM's vmbridged and man: links into the RPM's pages."""
    src = build.root / "usr/lib/systemd" / kind
    for name in ("vmbridged.service", "vmbridged.socket"):
        text = (src / name).read_text().replace("ExecStart=/usr/bin/vmbridged",
                                                f"ExecStart={build.root}/usr/bin/vmbridged")
        (tmp_path / name).write_text(text)
    env = dict(os.environ, MANPATH=str(build.root / "usr/share/man"))
    env.setdefault("XDG_RUNTIME_DIR", str(tmp_path))
    cmd = [analyze] + (["--user"] if kind == "user" else []) + \
        ["verify", str(tmp_path / "vmbridged.socket"), str(tmp_path / "vmbridged.service")]
    out = run(cmd, env=env, timeout=60)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), \
        f"{' '.join(cmd)}:\n{out.stdout}{out.stderr}"


def test_system_units_settings():
    service = unit(os.path.join(UNITS, "vmbridged.service"))
    s = service["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["ExecStart"] == "/usr/bin/vmbridged"
    assert s["KillMode"] == "process"  # a crash must not take the VMs with it
    assert s["Restart"] == "on-failure"
    assert s["RuntimeDirectory"] == "vmbridge" and s["RuntimeDirectoryMode"] == "0700"
    assert s["RuntimeDirectoryPreserve"] == "yes"
    assert s["ConfigurationDirectory"] == "vmbridge"
    assert "WatchdogSec" in s
    assert "vmbridged.socket" in service["Unit"]["Wants"] and "Requires" not in service["Unit"]
    socket_ = unit(os.path.join(UNITS, "vmbridged.socket"))["Socket"]
    assert socket_["ListenStream"] == f"/run/vmbridge/{MANAGER}"
    assert socket_["FileDescriptorName"] == MANAGER
    assert socket_["SocketMode"] == "0600" and socket_["DirectoryMode"] == "0700"


def test_user_units_settings():
    s = unit(os.path.join(UNITS, "user", "vmbridged.service"))["Service"]
    assert s["Type"] == "notify" and s["KillMode"] == "process" and s["Restart"] == "on-failure"
    assert s["RuntimeDirectory"] == "vmbridge" and s["RuntimeDirectoryPreserve"] == "yes"
    socket_ = unit(os.path.join(UNITS, "user", "vmbridged.socket"))["Socket"]
    assert socket_["ListenStream"] == f"%t/vmbridge/{MANAGER}"
    assert socket_["FileDescriptorName"] == MANAGER and socket_["SocketMode"] == "0600"


def test_socket_name_is_what_vmbridged_looks_for():
    with open(os.path.join(ROOT, "vmbridge", "manager.py"), encoding="utf-8") as f:
        manager = f.read()
    assert re.search(rf'^INTERFACE = "{re.escape(MANAGER)}"$', manager, re.M)
    assert re.search(r"^MANAGER_SOCKET = INTERFACE$", manager, re.M)


def load_check_sandbox():
    path = os.path.join(UNITS, "check-sandbox")
    loader = importlib.machinery.SourceFileLoader("check_sandbox", path)
    spec = importlib.util.spec_from_loader("check_sandbox", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_check_sandbox_applies_the_units_settings():
    check = load_check_sandbox()
    props = check.unit_properties(os.path.join(UNITS, "vmbridged.service"))
    keys = [p.split("=", 1)[0] for p in props]
    for key in ("NoNewPrivileges", "ProtectSystem", "CapabilityBoundingSet", "SystemCallFilter",
                "RestrictAddressFamilies", "LimitNOFILE", "UMask"):
        assert key in keys
    for key in ("Type", "ExecStart", "KillMode", "Restart", "WatchdogSec", "RuntimeDirectoryPreserve"):
        assert key not in keys
    # Never the real daemon's directories (a transient unit deletes its runtime directory).
    assert "RuntimeDirectory=vmbridge-check-sandbox" in props


def test_check_sandbox_under_a_service_manager():
    """Where systemd runs (not in this project's CI sandbox), QEMU and virtiofsd work in the sandbox."""
    if os.geteuid() != 0:
        pytest.skip("needs root (TAP, the system manager)")
    out = run([os.path.join(UNITS, "check-sandbox")], timeout=300)
    if out.returncode == 77:
        pytest.skip("no systemd service manager here (systemd is not PID 1)")
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------- man pages

@pytest.mark.parametrize("page", sorted(MAN_PAGES))
def test_man_page_renders_without_warnings(page):
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    path = os.path.join(MAN, page)
    env = dict(os.environ, LC_ALL="C.UTF-8")
    out = run(["groff", "-man", "-Tutf8", "-ww", "-z", path], env=env)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    if shutil.which("man"):
        env.pop("MAN_KEEP_FORMATTING", None)
        out = run(["man", "--warnings", "-l", path], env=dict(env, MANWIDTH="80"))
        assert out.returncode == 0 and out.stderr == "", out.stderr
        text = re.sub(".\b", "", out.stdout)  # overstrike bold, should man keep it
        for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "SEE ALSO"):
            assert f"\n{section}\n" in text
        assert "\u2010\n" not in text, "hyphenated line ends (systemd's pages have none)"


def test_man_pages_carry_the_version_and_cross_references():
    for page in MAN_PAGES:
        with open(os.path.join(MAN, page), encoding="utf-8") as f:
            text = f.read()
        assert f'"vmbridge {version()}"' in text.split("\n.TH ", 1)[1].split("\n", 1)[0], page
        for other in MAN_PAGES:
            if other != page:
                name, section = other.rsplit(".", 1)
                assert f".BR {name} ({section})" in text, f"{page} does not refer to {other}"
    with open(os.path.join(MAN, "vmctl.1"), encoding="utf-8") as f:
        vmctl = f.read()
    for verb in VERBS:
        assert re.search(rf"^\.B[IR]? {verb}\b", vmctl, re.M), f"vmctl(1) does not describe {verb}"
    for section in ("COMMANDS", "OPTIONS", '"EXIT STATUS"', "ENVIRONMENT", "FILES", "EXAMPLES"):
        assert f"\n.SH {section}\n" in vmctl
    # Every key of the definition files is documented in vmbridge.conf(5) and as a vmctl option.
    with open(os.path.join(ROOT, "vmbridge", "interfaces", f"{MANAGER}.varlink"), encoding="utf-8") as f:
        idl = f.read()
    config = idl.split("type MachineConfig(", 1)[1].split(")\n", 1)[0]
    keys = [m.group(1).replace("_", "-") for m in re.finditer(r"^\t(\w+): ", config, re.M)]
    with open(os.path.join(MAN, "vmbridge.conf.5"), encoding="utf-8") as f:
        conf = f.read().replace("\\-", "-")
    for key in keys:
        if key == "name":
            continue
        assert re.search(rf"^\.BI?R? {re.escape(key)}=", conf, re.M), f"vmbridge.conf(5) lacks {key}="
        if key != "autostart":
            assert f"--{key}" in vmctl.replace("\\-", "-"), f"vmctl(1) lacks --{key}"


# ---------------------------------------------------------- bash completion

COMPLETE = r"""
source /usr/share/bash-completion/bash_completion
source "$COMPLETION"
compopt() { :; }  # only valid inside a real completion
c() {
    COMP_LINE=$1; COMP_POINT=${#1}
    read -ra COMP_WORDS <<<"$1"; [[ $1 == *" " ]] && COMP_WORDS+=("")
    COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=()
    _vmctl vmctl "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
    printf '%s\n' "${COMPREPLY[*]}"
}
while IFS= read -r line; do c "$line"; done
"""


@pytest.fixture
def complete(tmp_path):
    if not os.path.exists("/usr/share/bash-completion/bash_completion"):
        pytest.skip("bash-completion is not installed (apt-get install bash-completion)")
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls"
    (fake / "vmctl").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n"
                                "printf 'web running 1234 /r/machines/web/control\\n"
                                "build-2 paused 99 /r/machines/build-2/control\\n'\n")
    (fake / "vmctl").chmod(0o755)
    runtime = tmp_path / "run"
    runtime.mkdir()

    def complete(*lines, socket_exists=True):
        manager = runtime / MANAGER
        if socket_exists and not manager.exists():
            import socket
            s = socket.socket(socket.AF_UNIX)
            s.bind(str(manager))
            s.close()
        env = dict(os.environ, COMPLETION=COMPLETION, PATH=f"{fake}:{os.environ['PATH']}",
                   VMBRIDGE_RUNTIME_DIR=str(runtime))
        out = run(["bash", "-c", COMPLETE], input="\n".join(lines) + "\n", env=env, cwd=tmp_path)
        assert out.returncode == 0 and out.stderr == "", out.stderr
        return out.stdout.splitlines()

    complete.calls = calls
    return complete


def test_completion_is_valid_bash():
    assert run(["bash", "-n", COMPLETION]).returncode == 0


def test_completion_verbs_and_options(complete):
    verbs, p, start_opts, accel, json_modes, filters, after_json = complete(
        "vmctl ", "vmctl p", "vmctl start web --", "vmctl start web --accel=", "vmctl --json=",
        "vmctl events web --filter=SHUT", "vmctl --json ")
    assert verbs.split() == VERBS
    assert p.split() == ["pause", "poweroff"]
    for option in ("--runtime-dir=", "--address=", "--timeout=", "--memory=", "--cpus=", "--linux=",
                   "--drive=", "--pcie-ports=", "--ephemeral", "--quiet", "--no-legend", "--json"):
        assert option in start_opts.split()
    assert accel.split() == ["auto", "kvm", "tcg"]
    assert json_modes.split() == ["short", "pretty"]
    assert filters.split() == ["SHUTDOWN"]
    assert after_json.split() == VERBS  # --json takes its value only as --json=MODE
    console_opts, after_tail = complete("vmctl console web --", "vmctl console --tail 5 ")
    for option in ("--read-only", "--force", "--tail="):
        assert option in console_opts.split()
    assert after_tail.split() == ["web", "build-2"]     # --tail's value is not the VM


def test_completion_machine_names_from_vmctl_list(complete):
    names, prefixed, listed, by_address = complete(
        "vmctl pause ", "vmctl describe b", "vmctl list ", "vmctl --address=/x/control pause ")
    assert names.split() == ["web", "build-2"]
    assert prefixed.split() == ["build-2"]
    assert listed == "" and by_address == ""
    calls = complete.calls.read_text().splitlines()
    assert calls and all(c.endswith("list --no-legend") for c in calls)


def test_completion_storage_and_verb_options(complete, tmp_path):
    (tmp_path / "disk.img").touch()
    actions, names, binding, files, remove_file, by_address, by_address_file, start_flags, remove_flags = complete(
        "vmctl storage ", "vmctl storage add ", "vmctl storage add web ", "vmctl storage add web data di",
        "vmctl storage remove web data ", "vmctl --address=/x/control storage add ",
        "vmctl --address=/x/control storage add data di", "vmctl start web --p", "vmctl remove --f")
    assert actions.split() == ["add", "remove", "replace"]
    assert names.split() == ["web", "build-2"]
    assert binding == "" and remove_file == "" and by_address == ""
    assert files.split() == by_address_file.split() == ["disk.img"]
    assert "--persistent" in start_flags.split() and "--pcie-ports=" in start_flags.split()
    assert remove_flags.split() == ["--force"]


def test_completion_runs_nothing_without_vmbridged(complete):
    assert complete("vmctl pause ", socket_exists=False) == [""]
    assert not complete.calls.exists()


def test_completion_and_man_page_match_the_cli():
    """Once vmctl exists: its verbs and options are the ones documented and completed."""
    # A verb module may be there before the package is (vmbridge/cli/ as a namespace package).
    if not os.path.exists(os.path.join(ROOT, "vmbridge", "cli", "__init__.py")):
        pytest.skip("vmctl (vmbridge.cli) is not in this tree yet")
    vmctl = [sys.executable, os.path.join(ROOT, "bin", "vmctl")]
    with open(COMPLETION, encoding="utf-8") as f:
        completion = f.read()
    with open(os.path.join(MAN, "vmctl.1"), encoding="utf-8") as f:
        man = f.read().replace("\\-", "-")
    top = run(vmctl + ["--help"], timeout=30)
    assert top.returncode == 0, top.stderr
    for verb in VERBS:
        assert re.search(rf"\b{verb}\b", top.stdout), f"vmctl --help does not list {verb}"
    for verb in VERBS:
        out = run(vmctl + [verb, "--help"], timeout=30)
        assert out.returncode == 0, out.stderr
        for option in set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", out.stdout)) - {"--help"}:
            assert option in completion, f"completion lacks {verb} {option}"
            assert option in man, f"vmctl(1) lacks {verb} {option}"
