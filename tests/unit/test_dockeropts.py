# SPDX-License-Identifier: Apache-2.0
"""``fastflannel docker-opts`` against Flannel's dist/mk-docker-opts.sh: the expected files below are what the
script writes for the same subnet.env (written out from the script's documented behaviour: DOCKER_OPT_* in the
order ``set`` lists them, each ``NAME="value"``, then ``KEY="<previous KEY value + space><space>opt...">``)."""
from __future__ import annotations

import pytest

from fastflannel import dockeropts
from fastflannel.lab.cli import main as fastflannel_main

SUBNET_ENV = "FLANNEL_NETWORK=100.96.0.0/16\nFLANNEL_SUBNET=100.96.5.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ={masq}\n"

BOTH_MASQ = ('DOCKER_OPT_BIP="--bip=100.96.5.1/24"\n'
             'DOCKER_OPT_IPMASQ="--ip-masq=false"\n'
             'DOCKER_OPT_MTU="--mtu=1450"\n'
             'DOCKER_OPTS=" --bip=100.96.5.1/24 --ip-masq=false --mtu=1450"\n')


@pytest.fixture
def files(tmp_path):
    def make(masq="true", text=None):
        src = tmp_path / "subnet.env"
        src.write_text(SUBNET_ENV.format(masq=masq) if text is None else text)
        return str(src), str(tmp_path / "run" / "docker_opts.env")
    return make


def run(src, dst, *flags, environ=None):
    rc = dockeropts.main(["-f", src, "-d", dst, *flags], environ=environ or {})
    return rc, (open(dst).read() if rc == 0 else None)


def test_default_writes_individual_and_combined(files):
    src, dst = files()
    assert run(src, dst) == (0, BOTH_MASQ)


@pytest.mark.parametrize("flags,masq,expected", [
    (["-c"], "true", 'DOCKER_OPTS=" --bip=100.96.5.1/24 --ip-masq=false --mtu=1450"\n'),
    (["-i"], "true", 'DOCKER_OPT_BIP="--bip=100.96.5.1/24"\nDOCKER_OPT_IPMASQ="--ip-masq=false"\n'
                     'DOCKER_OPT_MTU="--mtu=1450"\n'),
    (["-i", "-c"], "true", BOTH_MASQ),
    # fastflanneld does not masquerade: docker must
    (["-c"], "false", 'DOCKER_OPTS=" --bip=100.96.5.1/24 --ip-masq=true --mtu=1450"\n'),
    # -m: no --ip-masq at all
    (["-m"], "true", 'DOCKER_OPT_BIP="--bip=100.96.5.1/24"\nDOCKER_OPT_MTU="--mtu=1450"\n'
                     'DOCKER_OPTS=" --bip=100.96.5.1/24 --mtu=1450"\n'),
    (["-c", "-k", "DOCKER_NETWORK_OPTIONS"], "true",
     'DOCKER_NETWORK_OPTIONS=" --bip=100.96.5.1/24 --ip-masq=false --mtu=1450"\n'),
])
def test_flags(files, flags, masq, expected):
    src, dst = files(masq)
    assert run(src, dst, *flags) == (0, expected)


def test_combined_key_keeps_its_previous_value(files):
    src, dst = files()
    assert run(src, dst, "-c", environ={"DOCKER_OPTS": "-H fd://"}) == (
        0, 'DOCKER_OPTS="-H fd://  --bip=100.96.5.1/24 --ip-masq=false --mtu=1450"\n')


def test_quoted_and_exported_values_as_the_shell_reads_them(files):
    src, dst = files(text='export FLANNEL_SUBNET="10.1.2.1/24"\nFLANNEL_MTU=1400\n')
    assert run(src, dst, "-c") == (0, 'DOCKER_OPTS=" --bip=10.1.2.1/24 --mtu=1400"\n')


def test_bad_input_is_a_clear_error_and_writes_nothing(files, capsys):
    src, dst = files(masq="yes")
    assert run(src, dst) == (1, None)
    assert "Invalid value of FLANNEL_IPMASQ: yes" in capsys.readouterr().err
    src, dst = files(text="FLANNEL_MTU=1450\n")
    assert run(src, dst) == (1, None)
    assert "no FLANNEL_SUBNET" in capsys.readouterr().err
    assert run(src + ".missing", dst) == (1, None)
    assert "is fastflanneld running" in capsys.readouterr().err
    import os
    assert not os.path.exists(dst)


def test_fastflannel_command_dispatches(files, capsys):
    src, _ = files()
    assert fastflannel_main(["docker-opts", "-f", src, "-d", "-", "-c"]) == 0
    assert capsys.readouterr().out == 'DOCKER_OPTS=" --bip=100.96.5.1/24 --ip-masq=false --mtu=1450"\n'
