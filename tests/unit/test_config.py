"""Config errors name the key and what was expected; good configs parse to records."""

import os
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitvmm import config
from splitvmm.config import VmConfig, config_to_dict, load_config, parse_config, parse_size
from splitvmm.errors import ConfigError
from splitvmm.protocol.models import MODELS, VIRTIO_BLK, default_mac
from tests.documents import places

GOOD = """
[vm]
name = "t"
memory = "64M"
vcpus = 2
[boot]
kernel = "kernel.elf"
cmdline = "console=ttyS0"
[[device]]
name = "serial0"
model = "serial"
output = "out.log"
"""


@pytest.fixture
def kernel_dir(tmp_path: Path) -> Path:
    (tmp_path / "kernel.elf").write_bytes(b"\x7fELF")
    return tmp_path


def write(tmp: Path, text: str) -> Path:
    path = tmp / "vm.toml"
    path.write_text(text)
    return path


def test_config_good_file_parses(kernel_dir):
    cfg = load_config(write(kernel_dir, GOOD))
    assert (cfg.vm.memory, cfg.vm.vcpus, cfg.boot.kernel, cfg.devices[0].options["output"]) == (
        64 << 20,
        2,
        kernel_dir / "kernel.elf",
        str(kernel_dir / "out.log"),  # from the config's directory, as the kernel is
    )


@pytest.mark.parametrize(
    "text,message",
    [
        ("[vm\n", "not valid TOML"),
        (GOOD.replace('memory = "64M"', 'memory = "lots"'), "vm.memory: expected a size"),
        # RAM is mapped in pages; past 1 TiB a typo, not a VM (MAX_MEMORY); below 16 MiB no
        # room for a kernel and its tables.
        (GOOD.replace('"64M"', "16777217"), "vm.memory: expected a multiple of 4 KiB .* 16777217"),
        (GOOD.replace('"64M"', '"2T"'), r"vm.memory: expected a multiple of 4 KiB from 16M to 1T"),
        (GOOD.replace('"64M"', '"15M"'), r"vm.memory: expected a multiple of 4 KiB from 16M to 1T"),
        (GOOD.replace("vcpus = 2", "vcpus = 0"), "vm.vcpus: 0 is outside"),
        (GOOD.replace("vcpus = 2", 'vcpus = "2"'), "vm.vcpus: expected int"),
        (
            GOOD.replace('kernel = "kernel.elf"', 'kernel = "nope"'),
            "boot.kernel: .*nope does not exist",
        ),
        (GOOD.replace('kernel = "kernel.elf"', ""), "exactly one of kernel"),
        (GOOD.replace('model = "serial"', 'model = "floppy"'), "unknown model 'floppy'"),
        (GOOD.replace('output = "out.log"', "speed = 9600"), "unknown key 'speed'"),
        (GOOD + '[[device]]\nname = "serial0"\nmodel = "serial"\n', "used twice"),
        (GOOD.replace("[vm]", "[vm]\ncolour = 1"), "vm: unknown key 'colour'"),
        (GOOD.replace('name = "serial0"\n', 'name = "serial0"\non_crash = "panic"\n'), "on_crash"),
        (GOOD.replace('name = "t"', 'name = "a/b"'), "vm.name"),
        (
            GOOD.replace('[boot]\nkernel = "kernel.elf"\ncmdline = "console=ttyS0"\n', ""),
            r"config\.boot: missing \(expected dict\)",
        ),
        (GOOD.replace('name = "serial0"\n', ""), r"device\[0\]\.name: missing \(expected str\)"),
    ],
    ids=[
        "bad-toml",
        "bad-size",
        "memory-not-whole-pages",
        "memory-past-1t",
        "memory-below-16m",
        "zero-vcpus",
        "vcpus-string",
        "missing-kernel",
        "no-kernel-or-firmware",
        "unknown-model",
        "unknown-option",
        "duplicate-name",
        "unknown-vm-key",
        "bad-on-crash",
        "bad-vm-name",
        "no-boot-table",
        "device-without-name",
    ],
)
def test_config_mistake_raises_error_naming_key(kernel_dir, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(kernel_dir, text))


def test_config_of_a_character_device_is_refused_before_it_is_read():
    """/dev/zero would be read to the cap, a terminal waited on for its input."""
    with pytest.raises(ConfigError, match="/dev/null: cannot read the config: is a character"):
        load_config(Path("/dev/null"))


def test_config_through_a_symlink_takes_relative_paths_from_the_target_directory(tmp_path):
    """`ln -s ~/.cache/splitvmm/guest/debian.toml`: the files it names lie beside it."""
    kit, here = tmp_path / "kit", tmp_path / "here"
    kit.mkdir()
    here.mkdir()
    (kit / "kernel.elf").write_bytes(b"\x7fELF")
    (kit / "vm.toml").write_text('[boot]\nkernel = "kernel.elf"\n')
    (here / "vm.toml").symlink_to(kit / "vm.toml")
    assert load_config(here / "vm.toml").boot.kernel == kit / "kernel.elf"


def test_config_snapshot_dir_through_a_symlink_is_the_directory_it_names(kernel_dir):
    """As the monitor's Landlock rule and `ctl snapshot`'s check (the target's parent
    resolved) see it: both compare resolved paths."""
    (kernel_dir / "snaps").mkdir()
    (kernel_dir / "link").symlink_to(kernel_dir / "snaps")
    text = GOOD.replace("[boot]", 'snapshot_dirs = ["link"]\n[boot]')
    assert load_config(write(kernel_dir, text)).vm.snapshot_dirs == (kernel_dir / "snaps",)


def test_config_to_dict_leaves_out_the_snapshot_dirs(kernel_dir):
    """What the monitor may write to is the operator's to say at each start, never what a
    snapshot's stored config says."""
    (kernel_dir / "snaps").mkdir()
    text = GOOD.replace("[boot]", 'snapshot_dirs = ["snaps"]\n[boot]')
    assert "snapshot_dirs" not in config_to_dict(load_config(write(kernel_dir, text)))["vm"]


def test_config_restored_with_a_kernel_is_refused(tmp_path):
    data = {"boot": {"kernel": "k"}}
    with pytest.raises(ConfigError, match="boot: a restore loads no kernel or initrd"):
        parse_config(data, tmp_path, check_files=False, restored=True)


@pytest.mark.parametrize("name", ["ramdisk", "vmx", "pci0", "vcpu0x", "manifests", "controls"])
def test_config_device_named_like_a_chunk_only_in_part_is_accepted(name: str) -> None:
    cfg = _cfg(devices=f'[[device]]\nname = "{name}"\nmodel = "serial"\n')
    assert cfg.devices[0].name == name


def test_config_missing_file_raises_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


@pytest.mark.timeout(10)
def test_config_fifo_nobody_writes_to_refused_without_waiting_for_a_writer(tmp_path):
    """A FIFO nobody writes to hung `up` in open() for ever."""
    os.mkfifo(tmp_path / "vm.toml")
    with pytest.raises(ConfigError, match=r"vm\.toml: cannot read the config: a FIFO or pipe"):
        load_config(tmp_path / "vm.toml")


@pytest.mark.timeout(10)
def test_config_from_a_pipe_is_read_to_its_end(tmp_path):
    """`make-config | splitvmm up /dev/stdin`: a pipe, whose writer may write later.
    Refusing every FIFO (to stop the hang above) refused this too."""
    (tmp_path / "bzImage").write_bytes(b"k")
    r, w = os.pipe()

    def writer() -> None:
        time.sleep(0.1)
        os.write(w, b'[boot]\nkernel = "%s"\n' % str(tmp_path / "bzImage").encode())
        os.close(w)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        cfg = load_config(Path(f"/proc/self/fd/{r}"))
    finally:
        thread.join()
        os.close(r)

    assert cfg.boot.kernel == tmp_path / "bzImage"


@pytest.mark.timeout(10)
def test_config_from_a_pipe_takes_relative_paths_from_the_working_directory(tmp_path, monkeypatch):
    """A pipe has no directory: its relative paths were taken from /proc/self/fd (or /dev,
    for /dev/stdin), where no file the operator meant can be."""
    (tmp_path / "bzImage").write_bytes(b"k")
    monkeypatch.chdir(tmp_path)
    r, w = os.pipe()
    os.write(w, b'[boot]\nkernel = "bzImage"\n')
    os.close(w)
    try:
        cfg = load_config(Path(f"/proc/self/fd/{r}"))
    finally:
        os.close(r)
    assert cfg.boot.kernel == tmp_path / "bzImage"


def test_config_from_a_file_given_as_an_open_fd_takes_relative_paths_from_its_directory(
    tmp_path, monkeypatch
):
    """`splitvmm up /dev/stdin < conf/vm.toml`: a regular file, named by /dev or
    /proc/self/fd, whose relative paths were taken from there."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "bzImage").write_bytes(b"k")
    (conf / "vm.toml").write_bytes(b'[boot]\nkernel = "bzImage"\n')
    monkeypatch.chdir(tmp_path)
    fd = os.open(conf / "vm.toml", os.O_RDONLY)
    try:
        cfg = load_config(Path(f"/proc/self/fd/{fd}"))
    finally:
        os.close(fd)
    assert cfg.boot.kernel == conf / "bzImage"


def test_config_device_named_as_a_built_in_one_says_so(tmp_path):
    """A device of the operator's named "rtc" was refused as a name "used twice"."""
    (tmp_path / "k").write_bytes(b"k")
    data = {"boot": {"kernel": "k"}, "device": [{"name": "rtc", "model": "serial"}]}
    with pytest.raises(
        ConfigError, match=r"device 'rtc': the name is the built-in rtc device's.*vm\.rtc"
    ):
        parse_config(data, tmp_path)
    data["vm"] = {"rtc": False}
    assert [d.name for d in parse_config(data, tmp_path).devices] == ["rtc"]


@pytest.mark.parametrize(
    "text,size", [("64M", 64 << 20), ("2G", 2 << 30), ("512MiB", 512 << 20), ("4096", 4096)]
)
def test_parse_size_units_give_bytes(text, size):
    assert parse_size(text, "k") == size


def test_config_firmware_with_cmdline_raises(tmp_path):
    (tmp_path / "fw.bin").write_bytes(b"\x00")
    with pytest.raises(ConfigError, match="initrd and cmdline go with kernel"):
        parse_config({"boot": {"firmware": "fw.bin", "cmdline": "x"}}, tmp_path)


# -- input hygiene: names, sizes, depth and integer bounds, each a one-line error -------------
@pytest.mark.parametrize(
    "text,message",
    [
        (GOOD.replace('name = "t"', 'name = "t\\n"'), r"vm\.name: 't\\n' must be"),
        (GOOD.replace('name = "serial0"', 'name = "serial0\\n"'), "name must be 1-63"),
        (GOOD.replace('"64M"', '"' + "9" * 5000 + '"'), "vm.memory: expected a size"),
        (GOOD.replace('"64M"', "9" * 5000), "an integer has too many digits"),
        (GOOD.replace('"64M"', "9" * 4000), "vm.memory: .*got an integer of 13288 bits"),
        (GOOD.replace("vcpus = 2", "vcpus = " + "9" * 4000), "vm.vcpus: an integer of"),
        (GOOD.replace("vcpus = 2", "vcpus = 255"), r"vm\.vcpus: 255 is outside 1\.\.254"),
        (GOOD.replace("[vm]", f"[vm]\ncpuid_mask = {['1.ecx:1'] * 65}"), "vm.cpuid_mask"),
        (GOOD.replace("[vm]", f"[vm]\ncpuid_mask = {['1.ecx:' + '1' * 60]}"), "vm.cpuid_mask"),
        (GOOD.replace("[boot]", f"snapshot_dirs = {['.'] * 17}\n[boot]"), "vm.snapshot_dirs"),
        ("x = " + "[" * 100_000 + "]" * 100_000, "nested too deeply"),
        (GOOD + "#" * (1 << 20), "over 1 MiB"),
        (
            GOOD + 'on_crash = "restart"\nrestart_window = ' + "9" * 400,
            "restart_window: an integer of 1329 bits is outside",
        ),
        (GOOD.replace('"kernel.elf"', '"~nosuchuser/k"'), "boot.kernel: '~nosuchuser/k' is no"),
        (GOOD.replace("[boot]", 'snapshot_dirs = ["a\\u0000"]\n[boot]'), "vm.snapshot_dirs: 'a"),
        ("\ufeff" + GOOD, "starts with a UTF-8 byte-order mark"),
        (
            GOOD.replace('"kernel.elf"', '"k\\u0000.elf"'),
            r"boot\.kernel: 'k\\x00\.elf' is no usable path: it holds a NUL byte",
        ),
        # stat() of these fails with ENAMETOOLONG, which Path.is_file() and is_dir() raise
        (GOOD.replace('"kernel.elf"', '"' + "k" * 300 + '"'), "boot.kernel: .* File name too long"),
        (
            GOOD.replace("[boot]", 'snapshot_dirs = ["' + "s" * 300 + '"]\n[boot]'),
            "vm.snapshot_dirs: .* File name too long",
        ),
    ],
    ids=[
        "vm-name-trailing-newline",
        "device-name-trailing-newline",
        "memory-5000-digit-string",
        "memory-5000-digit-int",
        "memory-4000-digit-int",
        "vcpus-4000-digit-int",
        "vcpus-above-bound",
        "cpuid-mask-too-many",
        "cpuid-mask-too-long",
        "snapshot-dirs-too-many",
        "nested-arrays",
        "file-over-cap",
        "restart-window-400-digit-int",
        "kernel-unknown-user",
        "snapshot-dir-nul",
        "byte-order-mark",
        "kernel-nul",
        "kernel-name-too-long",
        "snapshot-dir-name-too-long",
    ],
)
def test_config_hostile_input_raises_one_line_error(kernel_dir, text, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(write(kernel_dir, text))
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


# -- default devices (protocol/models.py default_device): a PC's RTC -----------------------------
def _cfg(vm_extra: str = "", devices: str = "") -> VmConfig:
    text = f'[vm]\nname = "t"\n{vm_extra}[boot]\nfirmware = "fw.bin"\n{devices}'
    return parse_config(tomllib.loads(text), Path("/"), check_files=False)


def test_config_every_vm_has_the_default_rtc():
    cfg = _cfg()

    assert [(d.name, d.model, d.options) for d in cfg.devices] == [("rtc", "rtc", {"base": "utc"})]


def test_config_vm_rtc_false_leaves_it_out_and_stays_out_when_read_back():
    cfg = _cfg("rtc = false\n")
    again = parse_config(config_to_dict(cfg), Path("/"), check_files=False)

    assert cfg.devices == again.devices == ()


def test_config_rtc_table_sets_its_options_instead_of_the_default():
    cfg = _cfg(devices='[[device]]\nname = "clock"\nmodel = "rtc"\nbase = "localtime"\n')

    assert [(d.name, d.options["base"]) for d in cfg.devices] == [("clock", "localtime")]


def test_config_option_outside_its_choices_names_the_key():
    with pytest.raises(ConfigError, match=r"device 'clock'.base: expected one of utc, localtime"):
        _cfg(devices='[[device]]\nname = "clock"\nmodel = "rtc"\nbase = "mars"\n')


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (
            'model = "virtio-blk"\npath = "d.img"\nserial = "' + "x" * 21 + '"',
            r"\.serial: .* is 21 ",
        ),
        (
            'model = "virtio-blk"\npath = "d.img"\nserial = "\u00e9"',
            r"\.serial: '\u00e9' must be ASCII",
        ),
        ('model = "virtio-net"\ntap = "t0"\nmac = "zz"', r"\.mac: 'zz' is not six hex bytes"),
        (
            'model = "virtio-net"\ntap = "t0"\nmac = "01:00:00:00:00:01"',
            r"\.mac: .* is a multicast",
        ),
        (
            'model = "virtio-net"\ntap = "t0"\nmac = "00:00:00:00:00:00"',
            r"\.mac: .* is the all-zero",
        ),
    ],
    ids=["serial-too-long", "serial-not-ascii", "mac-not-hex", "mac-multicast", "mac-zero"],
)
def test_config_option_its_model_refuses_names_the_key(option, message):
    """These were the device process's to refuse, as it started: two lines (its crash logged,
    then the error) naming no key, and a launcher and device process started for nothing."""
    with pytest.raises(ConfigError, match=r"^device 'd0'" + message):
        _cfg(devices=f'[[device]]\nname = "d0"\n{option}\n')


def test_config_second_device_at_fixed_ports_refused():
    two = '[[device]]\nname = "a"\nmodel = "rtc"\n[[device]]\nname = "b"\nmodel = "rtc"\n'

    with pytest.raises(ConfigError, match=r"only one rtc device .* fixed ports 0x70-0x71"):
        _cfg(devices=two)


@pytest.fixture
def with_virtio_blk(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PCI descriptor known to the config, in this test only (not in MODELS yet)."""
    monkeypatch.setitem(MODELS, VIRTIO_BLK.name, VIRTIO_BLK)
    options = {o.name: (o.kind, o.default) for o in VIRTIO_BLK.options}
    monkeypatch.setitem(config.MODEL_OPTIONS, VIRTIO_BLK.name, options)


BLK = '[[device]]\nname = "{}"\nmodel = "virtio-blk"\n'


def test_config_option_without_default_missing_names_device_and_option(with_virtio_blk):
    with pytest.raises(ConfigError, match=r"device 'blk0'.path: missing; a virtio-blk device"):
        _cfg(devices=BLK.format("blk0"))


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("disk.img", "{dir}/disk.img"),
        ("/srv/disk.img", "/srv/disk.img"),
        ("unix:out.sock", "unix:{dir}/out.sock"),
        ("stdio", "stdio"),
    ],
)
def test_config_device_paths_are_taken_from_the_config_directory(kernel_dir, given, want):
    """As boot.kernel is: the same config means the same files from any working directory."""
    model, option = ("virtio-blk", "path") if given.endswith(".img") else ("serial", "output")
    device = f'[[device]]\nname = "d0"\nmodel = "{model}"\n{option} = "{given}"\n'
    cfg = load_config(write(kernel_dir, GOOD.split("[[device]]")[0] + device))

    assert cfg.devices[0].options[option] == want.format(dir=kernel_dir)


@pytest.mark.parametrize(
    ("first", "second", "refused"),
    [
        ("false", "false", True),
        ("true", "false", True),
        ("false", "true", True),
        ("true", "true", False),
    ],
    ids=["both-writable", "second-writable", "first-writable", "both-readonly"],
)
def test_config_one_image_on_two_devices_only_read_only(with_virtio_blk, first, second, refused):
    two = (
        BLK.format("a") + f'path = "d.img"\nreadonly = {first}\n'
        + BLK.format("b") + f'path = "d.img"\nreadonly = {second}\n'
    )  # fmt: skip

    if refused:
        with pytest.raises(
            ConfigError, match=r"device 'b'\.path: '/d\.img' is also the disk of device 'a'"
        ):
            _cfg(devices=two)
    else:
        assert len(_cfg(devices=two).devices) == 3  # and the default rtc


@pytest.mark.parametrize("readonly", ["false", "true"])
def test_config_output_that_is_a_disk_image_of_the_vm_is_refused(with_virtio_blk, readonly):
    """A serial output naming the disk (a slip: `output = "d.img"` for `path = "d.img"`) had
    the guest's console appended to the image, which no lock stopped: outputs take none."""
    devices = (
        BLK.format("blk0") + f'path = "d.img"\nreadonly = {readonly}\n'
        + '[[device]]\nname = "serial0"\nmodel = "serial"\noutput = "./d.img"\n'
    )  # fmt: skip

    with pytest.raises(
        ConfigError,
        match=r"device 'serial0'\.output: '/d\.img' is the disk image of device 'blk0'; the "
        "device's output would be appended to it",
    ):
        _cfg(devices=devices)


@pytest.mark.parametrize(
    ("boot", "output", "key"),
    [
        ('kernel = "k.elf"\n', "k.elf", "kernel"),
        ('kernel = "k.elf"\ninitrd = "initrd.img"\n', "./initrd.img", "initrd"),
        ('firmware = "fw.bin"\n', "fw.bin", "firmware"),
    ],
    ids=["kernel", "initrd", "firmware"],
)
def test_config_output_that_is_a_boot_file_of_the_vm_is_refused(boot, output, key):
    """A serial output naming the VM's firmware (a slip, as with a disk image) had the
    guest's console appended to it: a firmware no longer a multiple of 64 KiB, which the
    next boot refused, and a kernel or initrd changed by every run."""
    text = f'[vm]\nname = "t"\n[boot]\n{boot}[[device]]\nname = "serial0"\nmodel = "serial"\n'
    text += f'output = "{output}"\n'

    with pytest.raises(
        ConfigError,
        match=rf"device 'serial0'\.output: '/[a-z.]+' is the VM's boot\.{key}; the device's "
        "output would be appended to it",
    ):
        parse_config(tomllib.loads(text), Path("/"), check_files=False)


@pytest.mark.parametrize(
    "make",
    [
        lambda d: "sub/../fw.bin",
        lambda d: (d / "link").symlink_to(d) or "link/fw.bin",
        lambda d: os.link(d / "fw.bin", d / "same.bin") or "same.bin",
    ],
    ids=["dot-dot", "symlinked-directory", "hard-link"],
)
def test_config_output_that_is_a_boot_file_by_another_path_is_refused(tmp_path, make):
    """Only the boot file's own path was refused: the same firmware by another path had the
    guest's console appended to it too, and no check at run time caught it (the disks have
    monitor/slot.py refuse_outputs_on_disks): the next boot refused the grown firmware."""
    (tmp_path / "fw.bin").write_bytes(bytes(65536))
    (tmp_path / "sub").mkdir()
    output = make(tmp_path)
    text = '[vm]\nname = "t"\n[boot]\nfirmware = "fw.bin"\n'
    text += f'[[device]]\nname = "serial0"\nmodel = "serial"\noutput = "{output}"\n'

    with pytest.raises(ConfigError, match=r"is the VM's boot\.firmware; the device's output"):
        parse_config(tomllib.loads(text), tmp_path)


def test_config_outputs_beside_a_disk_image_are_fine(with_virtio_blk):
    devices = (
        BLK.format("blk0") + 'path = "d.img"\n'
        + '[[device]]\nname = "serial0"\nmodel = "serial"\noutput = "d.log"\n'
    )  # fmt: skip

    assert [d.name for d in _cfg(devices=devices).devices] == ["blk0", "serial0", "rtc"]


@pytest.mark.parametrize("image", ["stdio", "unix:d.img"])
def test_config_disk_image_named_like_an_output_stream_is_a_file(with_virtio_blk, image):
    """A disk image named "stdio" or "unix:PATH" is a file in the config's directory: those
    are an output's streams, not a disk's. Kept as given, "stdio" was also taken for the
    serial's default output and refused as its disk image."""
    devices = BLK.format("blk0") + f'path = "{image}"\n[[device]]\nname = "s"\nmodel = "serial"\n'

    cfg = _cfg(devices=devices)

    assert cfg.devices[0].options["path"] == f"/{image}"


def test_config_pci_model_may_appear_twice(with_virtio_blk):
    two = BLK.format("a") + 'path = "a.img"\n' + BLK.format("b") + 'path = "b.img"\n'

    cfg = _cfg(devices=two)

    assert [(d.name, d.options["path"]) for d in cfg.devices[:2]] == [
        ("a", "/a.img"),  # _cfg's config lives in /
        ("b", "/b.img"),
    ]


DEVICE = {"name": "serial0", "model": "serial"}


@pytest.mark.parametrize(
    ("extra", "budget"),
    [
        ({"on_crash": "restart"}, (5, 10.0)),
        ({"on_crash": "restart", "max_restarts": 3, "restart_window": "500ms"}, (3, 0.5)),
        ({"on_crash": "restart", "restart_window": 30}, (5, 30.0)),
        ({"on_crash": "restart", "restart_window": "1m"}, (5, 60.0)),
    ],
)
def test_config_restart_budget_parses_counts_and_durations(extra, budget):
    from splitvmm.config import _parse_device

    dev = _parse_device({**DEVICE, **extra}, "device", "vm", Path("/"))
    assert (dev.max_restarts, dev.restart_window_s) == budget


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"on_crash": "restart", "max_restarts": -1}, "max_restarts: -1 is outside"),
        ({"on_crash": "restart", "restart_window": "soon"}, "restart_window: 'soon' is not a"),
        ({"on_crash": "restart", "restart_window": 0}, "restart_window: 0 is outside"),
        # no window: no limit to the restarts of a device that crashes at once, every time
        ({"on_crash": "restart", "restart_window": "0s"}, "restart_window: '0s' is outside"),
        ({"on_crash": "restart", "restart_window": 0.0}, "restart_window: 0.0 is outside"),
        ({"on_crash": "restart", "restart_window": 86400.5}, "restart_window: 86400.5 is outside"),
        ({"on_crash": "restart", "restart_window": "1441m"}, "restart_window: '1441m' is outside"),
        ({"on_crash": "restart", "max_restarts": 1_000_001}, "max_restarts: 1000001 is outside"),
        ({"on_crash": "stop", "max_restarts": 2}, "max_restarts: a restart budget needs on_crash"),
    ],
)
def test_config_bad_restart_budget_raises_error_naming_key(extra, message):
    from splitvmm.config import _parse_device

    with pytest.raises(ConfigError, match=message):
        _parse_device({**DEVICE, **extra}, "device", "vm", Path("/"))


@pytest.mark.parametrize("name", ["..", "-x", "_x"])
@pytest.mark.parametrize(
    "doc",
    [
        lambda name: {"vm": {"name": name}},
        lambda name: {"device": [{"name": name, "model": "virtio-rng"}]},
    ],
    ids=["vm", "device"],
)
def test_config_name_of_allowed_characters_not_starting_with_one_says_what_starts_it(doc, name):
    """A name must start with a letter or digit: ".." was refused as not being "1-63 letters,
    digits, '_', '.' or '-'", which it is."""
    data = {"boot": {"firmware": "fw.bin"}, **doc(name)}

    with pytest.raises(ConfigError, match="the first a letter or digit"):
        parse_config(data, Path("/"), check_files=False)


@pytest.mark.parametrize("name", ["ram", "vm", "pci", "vcpu0", "vcpu12", "manifest"])
def test_config_device_named_like_a_snapshot_chunk_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=f"device '{name}': the name is reserved"):
        _cfg(devices=f'[[device]]\nname = "{name}"\nmodel = "serial"\n')


def test_config_device_named_like_the_control_socket_is_refused() -> None:
    with pytest.raises(ConfigError, match="the name is reserved .the VM's control socket is"):
        _cfg(devices='[[device]]\nname = "control"\nmodel = "serial"\n')


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ({"model": "\U000e0001" * 40}, "unknown model"),
        ({"model": "serial", "on_crash": "\U000e0001" * 40}, "on_crash: expected one of"),
        ({"model": "serial", "\U000e0001" * 40: 1}, "unknown key"),
    ],
    ids=["model", "on_crash", "key"],
)
def test_config_long_unprintable_values_stay_a_one_line_error(device, message):
    """Found by the mutation fuzz's review: these were shown whole, so 40 unprintable
    characters (10 each in a repr) made a 400-character error."""
    doc = {"boot": {"firmware": "fw.bin"}, "device": [{"name": "d0", **device}]}

    with pytest.raises(ConfigError, match=message) as err:
        parse_config(doc, Path("/"), check_files=False)
    assert "\n" not in str(err.value) and len(str(err.value)) < 300, str(err.value)


# -- any mutation of a whole config (hypothesis) ----------------------------------------------
# Every key a config may have, on every model: what a mutation starts from.
RICH = {
    "vm": {
        "name": "fuzz",
        "memory": "128M",
        "vcpus": 2,
        "cpuid_mask": ["1.ecx:0x80000000"],
        "snapshot_dirs": ["/tmp"],
        "rtc": True,
    },
    "boot": {"firmware": "fw.bin"},
    "device": [
        {"name": "serial0", "model": "serial", "output": "out.log", "on_crash": "restart",
         "max_restarts": 3, "restart_window": "60s"},
        {"name": "blk0", "model": "virtio-blk", "path": "disk.img", "readonly": False,
         "direct": False, "serial": "disk-1", "on_full": "pause", "on_crash": "stop"},
        {"name": "rng0", "model": "virtio-rng"},
        {"name": "con0", "model": "virtio-console", "output": "con.log"},
        {"name": "net0", "model": "virtio-net", "tap": "tap0", "mac": "52:54:00:12:34:56"},
        {"name": "clock", "model": "rtc", "base": "localtime"},
    ],
}  # fmt: skip
TOML_SCALARS = (
    st.text(max_size=30)
    | st.sampled_from(["", "0", "64M", "1T", "16M", "restart", "stop", "pause", "utc", "-1", "."])
    | st.integers()
    | st.sampled_from([0, -1, 1 << 63, 2**64, 10**400])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.datetimes()
)
TOML_VALUES = st.recursive(
    TOML_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=8,
)


def _mutations(doc: Any) -> st.SearchStrategy[Any]:
    """`doc` with one place replaced by any TOML value, removed, or given an unknown key."""
    paths = places(doc)

    def apply(path: tuple[Any, ...], how: str, value: Any) -> Any:
        return _changed(doc, path, how, value)

    return st.builds(
        apply, st.sampled_from(paths), st.sampled_from(["replace", "remove", "add"]), TOML_VALUES
    )


def _changed(doc: Any, path: tuple[Any, ...], how: str, value: Any, root: bool = True) -> Any:
    """`doc` with the place at `path` replaced by `value`, removed, or (a table) given an
    unknown key; the document itself stays a table, as TOML's top level is."""
    if not path:
        if how == "add" and isinstance(doc, dict):
            return {**doc, "unknown_key": value}
        return doc if root else value
    copy = dict(doc) if isinstance(doc, dict) else list(doc)
    if len(path) == 1 and how == "remove":
        del copy[path[0]]
    else:
        copy[path[0]] = _changed(doc[path[0]], path[1:], how, value, root=False)
    return copy


@settings(max_examples=400, deadline=None)
@given(doc=st.integers(1, 3).flatmap(lambda n: _stacked(RICH, n)))
def test_config_any_mutation_parses_or_raises_one_line_config_error(doc):
    """Whatever is where in the config (a value of any TOML type at any key, a key gone, a key
    nobody knows): it parses, or fails with a one-line ConfigError; and what parses comes
    back the same from its snapshot form (config_to_dict), as a restore reads it."""
    try:
        cfg = parse_config(doc, Path("/vm"), check_files=False)
    except ConfigError as e:
        assert "\n" not in str(e) and len(str(e)) < 300, str(e)
        return
    again = parse_config(config_to_dict(cfg), Path("/elsewhere"), check_files=False, restored=True)
    assert (again.vm.name, again.vm.memory, again.vm.vcpus) == (
        cfg.vm.name,
        cfg.vm.memory,
        cfg.vm.vcpus,
    )
    assert [(d.name, d.model, d.on_crash, d.options) for d in again.devices] == [
        (d.name, d.model, d.on_crash, d.options) for d in cfg.devices
    ]


def _stacked(doc: Any, n: int) -> st.SearchStrategy[Any]:
    """`n` mutations, one after the other."""
    if n == 0:
        return st.just(doc)
    return _mutations(doc).flatmap(lambda changed: _stacked(changed, n - 1))


def test_config_with_more_devices_than_a_vm_has_is_refused_before_they_are_parsed():
    devices = "".join(f'[[device]]\nname = "d{i}"\nmodel = "virtio-rng"\n' for i in range(65))
    with pytest.raises(ConfigError, match="65 devices; a VM has at most 64"):
        _cfg(devices=devices)


@pytest.mark.parametrize(
    "text,message",
    [
        (
            GOOD.replace('kernel = "kernel.elf"', 'kernel = "adir"'),
            r"boot\.kernel: .*adir does not exist or is not a file",
        ),
        (
            GOOD.replace("[boot]", 'snapshot_dirs = ["kernel.elf"]\n[boot]'),
            r"vm\.snapshot_dirs: .*kernel\.elf does not exist or is not a directory",
        ),
        (
            GOOD.replace("[boot]", 'snapshot_dirs = ["nope"]\n[boot]'),
            r"vm\.snapshot_dirs: .*nope does not exist or is not a directory",
        ),
    ],
    ids=["kernel-is-a-directory", "snapshot-dir-is-a-file", "snapshot-dir-missing"],
)
def test_config_path_of_the_wrong_kind_is_refused_naming_the_key(kernel_dir, text, message):
    """A kernel must be a regular file and a snapshot dir a directory: existing is not
    enough (a directory given as the kernel, a file as the directory the monitor's Landlock
    opens for snapshots)."""
    (kernel_dir / "adir").mkdir()
    with pytest.raises(ConfigError, match=message):
        load_config(write(kernel_dir, text))


def test_config_empty_mac_is_derived_per_nic_like_a_missing_one():
    """`mac = ""` (a template's unset variable) kept "" and every such NIC, in every VM,
    got the device's bare MAC 52:54:00:62:42:ff: two VMs on one bridge then shared a MAC."""
    text = '[vm]\nname = "t"\n[boot]\nfirmware = "fw.bin"\n' + "".join(
        f'[[device]]\nname = "{n}"\nmodel = "virtio-net"\ntap = "tap{i}"\n{mac}'
        for i, (n, mac) in enumerate([("net0", 'mac = ""\n'), ("net1", 'mac = ""\n'), ("net2", "")])
    )
    cfg = parse_config(tomllib.loads(text), Path("/"), check_files=False)
    macs = [d.options["mac"] for d in cfg.devices if d.model == "virtio-net"]
    assert macs == [default_mac("t", n) for n in ("net0", "net1", "net2")]


def test_config_empty_mac_of_a_stored_config_stays_the_saved_devices():
    """A snapshot taken before: its stored mac "" gave the device the bare MAC, which its
    saved state holds; a restore (restored=True) keeps "" so that the two still agree."""
    text = (
        '[vm]\nname = "t"\n[boot]\n'
        '[[device]]\nname = "net0"\nmodel = "virtio-net"\ntap = "tap0"\nmac = ""\n'
    )
    cfg = parse_config(tomllib.loads(text), Path("/"), check_files=False, restored=True)
    assert [d.options["mac"] for d in cfg.devices if d.model == "virtio-net"] == [""]


@pytest.mark.parametrize(
    "text,key",
    [
        (GOOD.replace('"kernel.elf"', '""'), "boot.kernel"),
        (GOOD.replace('cmdline = "console=ttyS0"', 'initrd = ""'), "boot.initrd"),
        (
            GOOD.replace('kernel = "kernel.elf"\ncmdline = "console=ttyS0"', 'firmware = ""'),
            "boot.firmware",
        ),
        (GOOD.replace('output = "out.log"', 'output = ""'), "device 'serial0'.output"),
        (GOOD.replace('output = "out.log"', 'output = "unix:"'), "device 'serial0'.output"),
    ],
    ids=["kernel", "initrd", "firmware", "output", "unix-output"],
)
def test_config_empty_path_is_refused_as_empty(kernel_dir, text, key):  # noqa: F811
    """`kernel = ""` (a template's unset variable) is Path(""), ".": the error named the
    config's directory ("boot.kernel: /home/me/vms does not exist or is not a file", of a
    directory that is there), and an empty output failed only as the device's fds were made
    ("'' cannot be created: its directory does not exist"). cli/guest.py's --cache-dir and
    restore's --set refuse an empty path so too."""
    with pytest.raises(ConfigError) as err:
        load_config(write(kernel_dir, text))
    assert str(err.value) == f"{key}: an empty path"


DEVICE = {"name": "serial0", "model": "serial"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"restart_window": "5s"}, "device 'serial0'.restart_window: a restart budget needs"),
        ({"on_crash": "leave", "restart_window": 2}, "'serial0'.restart_window: a restart budget"),
        ({"max_restarts": 2, "restart_window": 2}, "'serial0'.max_restarts: a restart budget"),
    ],
)
def test_config_restart_budget_without_restart_names_the_key_given(extra, message):
    """restart_window alone was refused as "device 'serial0'.max_restarts: ...": a key the
    config does not have."""
    from splitvmm.config import _parse_device

    with pytest.raises(ConfigError, match=message):
        _parse_device({**DEVICE, **extra}, "device", "vm", Path("/"))


def test_config_track_dirty_pages_is_kept_when_read_back_and_off_by_default():
    """A restored VM tracks its dirty pages as the one saved did (its config is the snapshot's)."""
    cfg = _cfg("track_dirty_pages = true\n")
    again = parse_config(config_to_dict(cfg), Path("/"), check_files=False)

    assert (cfg.vm.track_dirty_pages, again.vm.track_dirty_pages) == (True, True)
    assert _cfg("").vm.track_dirty_pages is False


def test_config_track_dirty_pages_not_a_bool_names_the_key():
    with pytest.raises(ConfigError, match="vm.track_dirty_pages"):
        _cfg('track_dirty_pages = "yes"\n')


def test_config_device_user_is_the_pair_and_none_by_default():
    assert _cfg("device_uid = 64000\ndevice_gid = 64001\n").vm.device_user == (64000, 64001)
    assert _cfg("").vm.device_user is None


def test_config_device_user_is_never_written_back():
    """The host user devices run as is the operator's to say at each start, not a snapshot's
    (config_to_dict: a restore takes it from the operator: monitor/restore.py)."""
    cfg = _cfg("device_uid = 64000\ndevice_gid = 64000\n")

    assert "device_uid" not in config_to_dict(cfg)["vm"]
    assert "device_gid" not in config_to_dict(cfg)["vm"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("device_uid = 64000\n", "vm.device_uid: vm.device_gid must be set with it"),
        ("device_gid = 64000\n", "vm.device_gid: vm.device_uid must be set with it"),
        ("device_uid = 0\ndevice_gid = 5\n", "vm.device_uid: 0 is outside 1..4294967294"),
        ("device_uid = 5\ndevice_gid = 0\n", "vm.device_gid: 0 is outside 1..4294967294"),
        ("device_uid = 4294967295\ndevice_gid = 5\n", "vm.device_uid: 4294967295 is outside"),
        ("device_uid = -1\ndevice_gid = 5\n", "vm.device_uid: -1 is outside"),
        ('device_uid = "nobody"\ndevice_gid = 5\n', "vm.device_uid: expected int, got str"),
        ("device_uid = true\ndevice_gid = 5\n", "vm.device_uid: expected int, got bool"),
    ],
)
def test_config_device_user_refused_names_the_key(lines: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _cfg(lines)


@pytest.mark.parametrize("name", [5, None, ["serial0"]], ids=repr)
def test_device_name_problem_of_a_name_that_is_no_string_says_the_rule(name: object) -> None:
    """A restore's stored config is untrusted JSON (monitor/restore.py): 5 spells "5"."""
    assert config.device_name_problem(name) == f"name must be {config.NAME_RULE}"
