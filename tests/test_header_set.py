"""The header set bcc compiles against is read into programs this process
loads: a set someone else could have written, or one that differs from what
tcptrace writes, is never used."""

import os

from tcptrace import headers

RELEASE = "6.18.44"


def read_set(root):
    return {rel: open(os.path.join(root, rel)).read() for rel in headers.files(RELEASE)}


def test_written_once_and_found_again(tmp_path):
    first = headers.ensure(str(tmp_path), RELEASE)
    assert read_set(first) == headers.files(RELEASE)
    assert headers.ensure(str(tmp_path), RELEASE) == first


def test_a_changed_file_is_not_used(tmp_path):
    root = headers.ensure(str(tmp_path), RELEASE)
    rel = sorted(headers.files(RELEASE))[0]
    with open(os.path.join(root, rel), "a") as f:
        f.write("\n#define planted 1\n")
    again = headers.ensure(str(tmp_path), RELEASE)
    assert again != root and read_set(again) == headers.files(RELEASE)


def test_a_file_others_may_write_is_not_used(tmp_path):
    root = headers.ensure(str(tmp_path), RELEASE)
    os.chmod(os.path.join(root, sorted(headers.files(RELEASE))[0]), 0o666)
    assert headers.ensure(str(tmp_path), RELEASE) != root


def test_a_link_is_not_followed(tmp_path):
    root = headers.ensure(str(tmp_path), RELEASE)
    rel = sorted(headers.files(RELEASE))[0]
    path = os.path.join(root, rel)
    elsewhere = tmp_path / "elsewhere.h"
    elsewhere.write_text(open(path).read())
    os.unlink(path)
    os.symlink(elsewhere, path)
    assert headers.ensure(str(tmp_path), RELEASE) != root


def test_a_set_owned_by_another_user_is_not_used(tmp_path):
    root = headers.ensure(str(tmp_path), RELEASE)
    if os.geteuid() == 0:
        os.chown(root, 65534, 65534)
        assert headers.ensure(str(tmp_path), RELEASE) != root
    else:  # only root can hand a directory to another user
        assert headers.ensure(str(tmp_path), RELEASE) == root
