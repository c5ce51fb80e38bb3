//! External data files as the personality opens them, judged by the real qemu-img 10 on twin
//! directories: every command that reads guest data opens the data file the header names
//! without being asked (exit codes, standard output and standard error the same as
//! qemu-img's: `map --output=json`, `check --output=json`, `compare`, `measure`, `info
//! --output=json`; what `convert` and `dd` write compared byte for byte), a relative name is
//! looked up in the working directory as qemu 10 does, a missing data file or a header without
//! its name fails with qemu's messages, `--image-opts data-file.filename=` names it instead,
//! and `amend -o compat=0.10` refuses a data file with qemu's message. The writers (`resize`,
//! `bitmap`, `amend` of the refcount width) write such images as qemu-img does (their guest
//! writes are judged in `data_file_write_xcheck`); internal snapshots of them are refused, as
//! qemu refuses them. Natively, cowclone keeps refusing data files unless `--allow-data-file`,
//! and looks a relative name up beside the image.

use std::path::{Path, PathBuf};

use crate::personality::{personality_dir, qemu_img_as};
use crate::util::{cowclone_args_in, describe, tool_ok_in};

/// Runs `args` with the real qemu-img in `dirs[0]` and the personality in `dirs[1]`; asserts
/// the same exit code, standard output and standard error, each twin's directory written as
/// `DIR` (absolute data file names differ between the twins by it).
fn assert_same(bin: &Path, dirs: &[PathBuf; 2], args: &[&str]) {
    let theirs = qemu_img_as(None, &dirs[0], args, &[]);
    let ours = qemu_img_as(Some(bin), &dirs[1], args, &[]);
    let text = |bytes: &[u8], dir: &Path| {
        String::from_utf8_lossy(bytes).replace(dir.parent().unwrap().to_str().unwrap(), "DIR")
    };
    let line = args.join(" ");
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "qemu-img {line}: exit codes differ\nqemu-img: {}\npersonality: {}",
        describe(&theirs),
        describe(&ours)
    );
    assert_eq!(
        text(&ours.stdout, &dirs[1]).replace("DIR/cowclone", "DIR/TWIN"),
        text(&theirs.stdout, &dirs[0]).replace("DIR/qemu", "DIR/TWIN"),
        "qemu-img {line}: stdout"
    );
    assert_eq!(
        text(&ours.stderr, &dirs[1]).replace("DIR/cowclone", "DIR/TWIN"),
        text(&theirs.stderr, &dirs[0]).replace("DIR/qemu", "DIR/TWIN"),
        "qemu-img {line}: stderr"
    );
}

/// Twin directories (real qemu-img, personality), each with `sub/a.qcow2` keeping its data in
/// `rel.data` named relatively (so in the directory qemu-img ran in), `sub/b.qcow2` keeping it
/// in `sub/b.data` named absolutely, both written by qemu-io, and `plain.qcow2` without one.
fn twins(tmp: &Path) -> [PathBuf; 2] {
    let dirs = [tmp.join("qemu"), tmp.join("cowclone")];
    for dir in &dirs {
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let b_data = dir.join("sub/b.data");
        let b_data = b_data.to_str().unwrap();
        for (image, data) in [("sub/a.qcow2", "rel.data"), ("sub/b.qcow2", b_data)] {
            let option = format!("data_file={data}");
            tool_ok_in(
                "qemu-img",
                dir,
                &["create", "-q", "-f", "qcow2", "-o", &option, image, "4M"],
            );
            tool_ok_in(
                "qemu-io",
                dir,
                &[
                    "-f",
                    "qcow2",
                    "-c",
                    "write -P 0x11 0 1M",
                    "-c",
                    "write -z 2M 64k",
                    "-c",
                    "write -P 0x22 3M 4k",
                    image,
                ],
            );
        }
        tool_ok_in(
            "qemu-img",
            dir,
            &["create", "-q", "-f", "qcow2", "plain.qcow2", "4M"],
        );
    }
    dirs
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn reading_commands_open_the_data_file_as_qemu_img_does() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twins(tmp.path());
    for image in ["sub/a.qcow2", "sub/b.qcow2"] {
        assert_same(&bin, &dirs, &["map", "--output=json", image]);
        assert_same(&bin, &dirs, &["map", image]);
        assert_same(&bin, &dirs, &["check", "--output=json", image]);
        assert_same(&bin, &dirs, &["info", "--output=json", image]);
        assert_same(&bin, &dirs, &["measure", "-O", "qcow2", image]);
        assert_same(&bin, &dirs, &["compare", image, "sub/b.qcow2"]);
        assert_same(&bin, &dirs, &["compare", image, "plain.qcow2"]);
    }
    // What convert and dd read through the data file, byte for byte.
    assert_same(
        &bin,
        &dirs,
        &["convert", "-O", "raw", "sub/a.qcow2", "a.raw"],
    );
    assert_same(
        &bin,
        &dirs,
        &["dd", "if=sub/b.qcow2", "of=b.raw", "bs=64k", "count=50"],
    );
    for out in ["a.raw", "b.raw"] {
        let (theirs, ours) = (read(&dirs[0].join(out)), read(&dirs[1].join(out)));
        assert!(theirs == ours, "{out}: convert/dd output differs");
        assert!(
            ours.contains(&0x11) && ours.contains(&0x22),
            "{out}: no data read"
        );
    }
    assert_same(&bin, &dirs, &["compare", "a.raw", "sub/a.qcow2"]);
}

#[test]
fn missing_and_unnamed_data_files_fail_with_qemus_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twins(tmp.path());
    // From sub/, the relative name rel.data names a file that is not there (qemu 10 looks in
    // the working directory, not beside the image).
    let subs = [dirs[0].join("sub"), dirs[1].join("sub")];
    for args in [
        &["map", "--output=json", "a.qcow2"][..],
        &["check", "a.qcow2"],
        &["compare", "a.qcow2", "b.qcow2"],
        &["convert", "-O", "raw", "a.qcow2", "x.raw"],
        &["measure", "-O", "qcow2", "a.qcow2"],
    ] {
        assert_same(&bin, &subs, args);
    }
    // info does not open the data file.
    assert_same(&bin, &subs, &["info", "a.qcow2"]);
    // A header whose data file name was removed (the data-file bit stays): the name is
    // required, and data-file.filename gives it.
    for dir in &dirs {
        let data = dir.join("sub/b.data");
        let opts = format!(
            "data-file.filename={},file.filename=sub/b.qcow2",
            data.display()
        );
        tool_ok_in(
            "qemu-img",
            dir,
            &["amend", "-o", "data_file=", "--image-opts", &opts],
        );
    }
    assert_same(&bin, &dirs, &["map", "sub/b.qcow2"]);
    assert_same(&bin, &dirs, &["check", "sub/b.qcow2"]);
    assert_same(&bin, &dirs, &["info", "sub/b.qcow2"]);
    for (index, dir) in dirs.iter().enumerate() {
        let opts = format!(
            "data-file.filename={},file.filename=sub/b.qcow2",
            dir.join("sub/b.data").display()
        );
        let theirs = qemu_img_as(
            None,
            dir,
            &["map", "--output=json", "--image-opts", &opts],
            &[],
        );
        let ours = qemu_img_as(
            Some(&bin),
            dir,
            &["map", "--output=json", "--image-opts", &opts],
            &[],
        );
        assert!(
            theirs.status.success(),
            "qemu-img map: {}",
            describe(&theirs)
        );
        assert_eq!(
            String::from_utf8_lossy(&ours.stdout),
            String::from_utf8_lossy(&theirs.stdout),
            "map --image-opts {opts} (twin {index}): {}",
            describe(&ours)
        );
    }
    // A data file given for an image without one is refused by both.
    for dir in &dirs {
        let opts = format!(
            "data-file.filename={},file.filename=plain.qcow2",
            dir.join("sub/b.data").display()
        );
        let ours = qemu_img_as(Some(&bin), dir, &["map", "--image-opts", &opts], &[]);
        let theirs = qemu_img_as(None, dir, &["map", "--image-opts", &opts], &[]);
        assert_eq!(
            ours.status.code(),
            theirs.status.code(),
            "{}",
            describe(&ours)
        );
        assert!(
            String::from_utf8_lossy(&ours.stderr)
                .contains("'data-file' can only be set for images with an external data file"),
            "{}",
            describe(&ours)
        );
    }
}

#[test]
fn amend_refuses_to_downgrade_an_image_with_a_data_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twins(tmp.path());
    let before = read(&dirs[1].join("sub/b.qcow2"));
    assert_same(&bin, &dirs, &["amend", "-o", "compat=0.10", "sub/b.qcow2"]);
    assert_eq!(
        read(&dirs[1].join("sub/b.qcow2")),
        before,
        "the image changed"
    );
    assert_same(&bin, &dirs, &["info", "--output=json", "sub/b.qcow2"]);
    // Renaming the data file and clearing data_file_raw change the header as qemu-img's do.
    assert_same(
        &bin,
        &dirs,
        &["amend", "-o", "data_file=foo", "sub/b.qcow2"],
    );
    assert_same(&bin, &dirs, &["info", "--output=json", "sub/b.qcow2"]);
    assert_same(&bin, &dirs, &["map", "sub/b.qcow2"]);
}

#[test]
fn native_commands_refuse_data_files_unless_allowed_and_look_beside_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    // Made from sub/ by qemu-img, so rel.data lies beside the image.
    tool_ok_in(
        "qemu-img",
        &dir.join("sub"),
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=rel.data",
            "a.qcow2",
            "1M",
        ],
    );
    tool_ok_in(
        "qemu-io",
        &dir.join("sub"),
        &["-f", "qcow2", "-c", "write -P 0x5a 0 64k", "a.qcow2"],
    );
    let refused = cowclone_args_in(dir, &["map", "sub/a.qcow2"]);
    assert!(!refused.status.success(), "{}", describe(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("refused by default"),
        "{}",
        describe(&refused)
    );
    let allowed = cowclone_args_in(
        dir,
        &[
            "map",
            "--output",
            "json",
            "--allow-data-file",
            "sub/a.qcow2",
        ],
    );
    let theirs = tool_ok_in(
        "qemu-img",
        &dir.join("sub"),
        &["map", "--output=json", "a.qcow2"],
    );
    assert!(allowed.status.success(), "{}", describe(&allowed));
    assert_eq!(
        String::from_utf8_lossy(&allowed.stdout),
        String::from_utf8_lossy(&theirs.stdout),
        "native map beside the image vs qemu-img map run from the image's directory"
    );
    // Looked up in the working directory only when asked (there is no rel.data there).
    let from_cwd = cowclone_args_in(
        dir,
        &[
            "map",
            "--allow-data-file",
            "--data-file-from-cwd",
            "sub/a.qcow2",
        ],
    );
    assert!(!from_cwd.status.success(), "{}", describe(&from_cwd));
}

#[test]
fn create_makes_a_relative_data_file_in_the_working_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twins(tmp.path());
    assert_same(
        &bin,
        &dirs,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=new.data",
            "sub/new.qcow2",
            "1M",
        ],
    );
    for dir in &dirs {
        assert!(
            dir.join("new.data").is_file(),
            "{}: no new.data",
            dir.display()
        );
        assert!(
            !dir.join("sub/new.data").exists(),
            "{}: sub/new.data",
            dir.display()
        );
    }
    let (theirs, ours) = (
        read(&dirs[0].join("sub/new.qcow2")),
        read(&dirs[1].join("sub/new.qcow2")),
    );
    assert!(theirs == ours, "the images differ");
    assert_same(&bin, &dirs, &["check", "sub/new.qcow2"]);
    // Natively, the name is created beside the image.
    let native = cowclone_args_in(
        &dirs[1],
        &["create", "--data-file", "n.data", "sub/n.qcow2", "1M"],
    );
    assert!(native.status.success(), "{}", describe(&native));
    assert!(dirs[1].join("sub/n.data").is_file() && !dirs[1].join("n.data").exists());
}

#[test]
fn writers_write_images_with_a_data_file_as_qemu_img_does() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twins(tmp.path());
    // The relative data file of sub/a.qcow2 is found in the working directory, as qemu finds it.
    for args in [
        &["resize", "sub/b.qcow2", "8M"][..],
        &["resize", "--shrink", "sub/a.qcow2", "3M"],
        &["bitmap", "--add", "sub/b.qcow2", "b0"],
        &["amend", "-o", "refcount_bits=8", "sub/b.qcow2"],
        &["check", "sub/a.qcow2"],
        &["check", "--output=json", "sub/b.qcow2"],
        &["map", "--output=json", "sub/a.qcow2"],
        &["map", "--output=json", "sub/b.qcow2"],
    ] {
        assert_same(&bin, &dirs, args);
    }
    for (theirs, ours) in [("rel.data", "rel.data"), ("sub/b.data", "sub/b.data")] {
        assert_eq!(
            std::fs::metadata(dirs[0].join(theirs)).unwrap().len(),
            std::fs::metadata(dirs[1].join(ours)).unwrap().len(),
            "{theirs}: the data file was resized differently"
        );
    }
}

#[test]
fn internal_snapshots_of_an_image_with_a_data_file_are_refused_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twins(tmp.path());
    let dir = &dirs[1];
    let before = (
        read(&dir.join("sub/b.qcow2")),
        read(&dir.join("sub/b.data")),
    );
    // Exit code and message as qemu-img's ("Could not create snapshot 's1': Operation not
    // supported").
    assert_same(&bin, &dirs, &["snapshot", "-c", "s1", "sub/b.qcow2"]);
    let after = (
        read(&dir.join("sub/b.qcow2")),
        read(&dir.join("sub/b.data")),
    );
    assert!(
        before == after,
        "a refused snapshot changed the image or its data file"
    );
    tool_ok_in("qemu-img", dir, &["check", "sub/b.qcow2"]);
}
