//! `convert` from an internal snapshot (`--snapshot`, qemu-img's `-l`), of several sources
//! concatenated, its `-p` progress lines and its `-o help` lists, each run by qemu-img 10 and
//! by cowclone (natively and as `cowclone qemu-img`) on the same input and judged by qemu-img
//! (Debian package qemu-utils): `compare` (guest content), `map --output=json` (where data and
//! holes are), `check`, and the very text and exit codes qemu-img prints.

use std::path::Path;
use std::process::Output;

use crate::util::{
    assert_qemu_check_clean, assert_same_content, cowclone_args_in as cowclone,
    cowclone_ok_args_in as ours, qemu_img_ok_in as qemu, qemu_io_in, qemu_map_shape, tool_in,
};

/// cowclone as qemu-img (`cowclone qemu-img ARGS`).
fn personality(dir: &Path, args: &[&str]) -> Output {
    let mut all = vec!["qemu-img"];
    all.extend_from_slice(args);
    cowclone(dir, &all)
}

fn assert_differs(dir: &Path, a: &str, b: &str) {
    let out = tool_in("qemu-img", dir, &["compare", a, b]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "qemu-img compare {a} {b} should differ"
    );
}

/// The exit code, standard output and standard error of a run.
fn result(out: &Output) -> (Option<i32>, String, String) {
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An image whose current state differs from its snapshot `sn1` (id 1), which holds patterns
/// 0xa at 4k and 0xb at 8k.
fn image_with_snapshot(dir: &Path) {
    qemu(dir, &["create", "-q", "-f", "qcow2", "t.qcow2", "64M"]);
    qemu_io_in(
        dir,
        "t.qcow2",
        &["write -P 0xa 4k 4k", "write -P 0xb 8k 4k"],
    );
    qemu(dir, &["snapshot", "-c", "sn1", "t.qcow2"]);
    qemu_io_in(
        dir,
        "t.qcow2",
        &[
            "write -P 0xc 4k 4k",
            "write -P 0xd 8k 4k",
            "write -P 0xe 1M 64k",
        ],
    );
}

#[test]
fn convert_from_a_snapshot_reads_what_qemu_img_reads() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    image_with_snapshot(d);
    qemu(
        d,
        &["convert", "-l", "sn1", "-O", "qcow2", "t.qcow2", "q.qcow2"],
    );
    qemu(d, &["convert", "-O", "qcow2", "t.qcow2", "now.qcow2"]);
    // Guard: the snapshot and the current state really differ.
    assert_differs(d, "q.qcow2", "now.qcow2");
    for (key, out) in [
        ("sn1", "c-name.qcow2"),
        ("1", "c-id.qcow2"),
        ("id=1,name=sn1", "c-both.qcow2"),
    ] {
        ours(
            d,
            &["convert", "--snapshot", key, "-O", "qcow2", "t.qcow2", out],
        );
        assert_same_content(&d.join(out), &d.join("q.qcow2"), "convert");
        assert_eq!(
            qemu_map_shape(&d.join(out)),
            qemu_map_shape(&d.join("q.qcow2")),
            "{key}"
        );
        assert_qemu_check_clean(&d.join(out), "convert");
    }
    // Raw output too, and the personality's -l spellings.
    qemu(
        d,
        &["convert", "-l", "snapshot.name=sn1", "t.qcow2", "q.raw"],
    );
    personality(
        d,
        &["convert", "-l", "snapshot.name=sn1", "t.qcow2", "c.raw"],
    );
    assert_eq!(
        std::fs::read(d.join("c.raw")).unwrap(),
        std::fs::read(d.join("q.raw")).unwrap()
    );
    let out = personality(
        d,
        &[
            "convert",
            "-l",
            "snapshot.id=1",
            "-O",
            "qcow2",
            "t.qcow2",
            "p.qcow2",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_content(&d.join("p.qcow2"), &d.join("q.qcow2"), "convert");
    // The source is only read.
    assert_qemu_check_clean(&d.join("t.qcow2"), "convert");
}

#[test]
fn convert_from_a_missing_snapshot_fails_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    image_with_snapshot(d);
    for args in [
        ["convert", "-l", "nope", "-O", "qcow2", "t.qcow2", "x.qcow2"],
        [
            "convert",
            "-l",
            "snapshot.id=1,snapshot.name=other",
            "-O",
            "qcow2",
            "t.qcow2",
            "x.qcow2",
        ],
    ] {
        let theirs = tool_in("qemu-img", d, &args);
        let mine = personality(d, &args);
        assert_eq!(result(&mine), result(&theirs), "{args:?}");
        assert_eq!(
            theirs.status.code(),
            Some(1),
            "guard: qemu-img refuses {args:?}"
        );
    }
    // With several sources only the keyed form is accepted.
    let args = ["convert", "-l", "sn1", "t.qcow2", "t.qcow2", "x.raw"];
    assert_eq!(
        result(&personality(d, &args)),
        result(&tool_in("qemu-img", d, &args))
    );
}

/// Three qcow2 images of different sizes, each with data where the others have none.
fn three_sources(dir: &Path) {
    for (name, size, writes) in [
        (
            "a.qcow2",
            "4M",
            vec!["write -P 1 0 64k", "write -P 2 3M 1M"],
        ),
        (
            "b.qcow2",
            "3M",
            vec!["write -P 3 1M 512k", "write -z 2M 64k"],
        ),
        ("c.qcow2", "5M", vec!["write -P 4 0 4k", "write -P 5 4M 1M"]),
    ] {
        qemu(dir, &["create", "-q", "-f", "qcow2", name, size]);
        qemu_io_in(dir, name, &writes);
    }
}

#[test]
fn concatenated_sources_convert_as_qemu_img_converts_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    three_sources(d);
    let sources = ["a.qcow2", "b.qcow2", "c.qcow2"];
    for (format, extra) in [("qcow2", None), ("qcow2", Some("-c")), ("raw", None)] {
        let tag = format!("{format}{}", extra.unwrap_or(""));
        let (q, c) = (format!("q{tag}.img"), format!("c{tag}.img"));
        let mut args = vec!["convert", "-O", format];
        args.extend(extra);
        args.extend(sources);
        let mut theirs = args.clone();
        theirs.push(&q);
        qemu(d, &theirs);
        let mut mine = args.clone();
        mine.push(&c);
        ours(d, &mine);
        assert_same_content(&d.join(&c), &d.join(&q), "convert");
        assert_eq!(
            qemu_map_shape(&d.join(&c)),
            qemu_map_shape(&d.join(&q)),
            "{tag}"
        );
        let size =
            |image: &str| crate::util::qemu_info_json(&d.join(image))["virtual-size"].clone();
        assert_eq!(
            size(&c),
            serde_json::json!(12u64 << 20),
            "{tag}: sizes add up"
        );
        if format == "qcow2" {
            assert_qemu_check_clean(&d.join(&c), "convert");
        }
    }
}

#[test]
fn concatenation_with_a_backing_file_is_refused_as_by_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    three_sources(d);
    let args = [
        "convert", "-O", "qcow2", "-B", "a.qcow2", "-F", "qcow2", "a.qcow2", "b.qcow2", "x.qcow2",
    ];
    let theirs = tool_in("qemu-img", d, &args);
    assert_eq!(theirs.status.code(), Some(1), "guard: qemu-img refuses");
    assert_eq!(result(&personality(d, &args)), result(&theirs));
    // Without -F too (the concatenation is what qemu-img refuses first).
    let no_format = [
        "convert", "-O", "qcow2", "-B", "a.qcow2", "a.qcow2", "b.qcow2", "x.qcow2",
    ];
    let theirs = tool_in("qemu-img", d, &no_format);
    assert_eq!(result(&personality(d, &no_format)), result(&theirs));
    assert!(!d.join("x.qcow2").exists());
}

#[test]
fn progress_lines_move_as_qemu_img_counts_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu(d, &["create", "-q", "-f", "qcow2", "t.qcow2", "128M"]);
    qemu_io_in(
        d,
        "t.qcow2",
        &["write 0 1M", "write 2M 1M", "write 4M 1M", "write 32M 1M"],
    );
    let args = [
        "convert",
        "-p",
        "-O",
        "qcow2",
        "-f",
        "qcow2",
        "t.qcow2",
        "out.qcow2",
    ];
    let theirs = qemu(d, &args);
    let mine = personality(d, &args);
    assert_eq!(result(&mine), result(&theirs));
    // Guard: four steps of a quarter each, as qemu-img counts its four data runs.
    assert!(String::from_utf8_lossy(&theirs.stdout).contains("(75.00/100%)"));
}

#[test]
fn refusals_before_converting_are_qemu_img_s() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu(d, &["create", "-q", "-f", "qcow2", "t.qcow2", "1M"]);
    std::fs::create_dir(d.join("sub")).unwrap();
    let lines: &[&[&str]] = &[
        &[
            "convert", "-C", "-S", "4k", "-O", "qcow2", "t.qcow2", "x.qcow2",
        ],
        &["convert", "-C", "-c", "-O", "qcow2", "t.qcow2", "x.qcow2"],
        &[
            "convert",
            "-C",
            "--salvage",
            "-O",
            "qcow2",
            "t.qcow2",
            "x.qcow2",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "nope",
            "t.qcow2",
            "sub/x.qcow2",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "nope",
            "-F",
            "qcow2",
            "t.qcow2",
            "sub/y.qcow2",
        ],
    ];
    for args in lines {
        let theirs = tool_in("qemu-img", d, args);
        assert_eq!(
            theirs.status.code(),
            Some(1),
            "guard: qemu-img refuses {args:?}"
        );
        assert_eq!(result(&personality(d, args)), result(&theirs), "{args:?}");
    }
}

#[test]
fn option_help_lists_what_qemu_img_lists() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu(d, &["create", "-q", "-f", "qcow2", "t.qcow2", "1M"]);
    let lines: &[&[&str]] = &[
        &["create", "-f", "qcow2", "-o", "help", "new.qcow2", "1M"],
        &["create", "-f", "qcow2", "-o", "cluster_size=4k,?"],
        &["create", "-o", "help"],
        &["create", "-f", "vdi", "-o", "help", "new.vdi"],
        &["create", "-f", "bochs", "-o", "help"],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "help",
            "t.qcow2",
            "out.qcow2",
        ],
        &["convert", "-O", "raw", "-o", "help", "t.qcow2", "out.raw"],
        &["convert", "-o", "help"],
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "backing_file=x,,help",
            "-o",
            "?",
        ],
        &["amend", "-f", "qcow2", "-o", "help", "t.qcow2"],
        &["amend", "-o", "cluster_size=4k,?", "t.qcow2"],
        &["amend", "-f", "qcow2", "-o", "help"],
        &["amend", "-o", "help"],
        &["amend", "-f", "bochs", "-o", "help"],
        &[
            "amend",
            "-f",
            "qcow2",
            "-o",
            "backing_file=x,",
            "-o",
            "help",
            "t.qcow2",
        ],
    ];
    for args in lines {
        let theirs = tool_in("qemu-img", d, args);
        assert_eq!(result(&personality(d, args)), result(&theirs), "{args:?}");
    }
    assert!(!d.join("new.qcow2").exists() && !d.join("out.qcow2").exists());
}

/// Runs the same convert by qemu-img (output `q.*`) and by cowclone as qemu-img (`c.*`) and
/// compares their maps without host offsets.
fn same_convert_map(dir: &Path, args: &[&str], ext: &str) {
    let (q, c) = (format!("q.{ext}"), format!("c.{ext}"));
    let mut theirs = args.to_vec();
    theirs.push(&q);
    qemu(dir, &theirs);
    let mut mine = args.to_vec();
    mine.push(&c);
    let out = personality(dir, &mine);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_content(&dir.join(&c), &dir.join(&q), "convert");
    assert_eq!(
        qemu_map_shape(&dir.join(&c)),
        qemu_map_shape(&dir.join(&q)),
        "{args:?}"
    );
}

#[test]
fn sparse_size_decides_data_and_holes_in_blocks_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=1k",
            "t.qcow2",
            "64M",
        ],
    );
    qemu_io_in(
        d,
        "t.qcow2",
        &[
            "write -P 0 0 64k",
            "write 0 1k",
            "write 8k 1k",
            "write 17k 1k",
            "write -P 0 65k 1k",
        ],
    );
    for sparse in ["4k", "8k", "16k"] {
        let args = [
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=1k",
            "-S",
            sparse,
            "t.qcow2",
        ];
        same_convert_map(d, &args, "qcow2");
        assert_qemu_check_clean(&d.join("c.qcow2"), "convert");
    }
    // Raw output: zero blocks inside data clusters stay holes, as qemu-img leaves them.
    qemu(d, &["create", "-q", "-f", "qcow2", "big.qcow2", "8M"]);
    qemu_io_in(
        d,
        "big.qcow2",
        &["write -P 7 0 4k", "write -P 0 4k 60k", "write -P 9 1M 64k"],
    );
    same_convert_map(d, &["convert", "-O", "raw", "big.qcow2"], "raw");
    let holes = qemu_map_shape(&d.join("c.raw"));
    assert!(
        holes.len() > 2,
        "guard: the raw output has holes inside the first cluster: {holes:?}"
    );
}

#[test]
fn skip_create_zeroes_the_target_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu(d, &["create", "-q", "-f", "qcow2", "src.qcow2", "64M"]);
    let (q, c) = ("q.qcow2", "c.qcow2");
    for compat in ["1.1", "0.10"] {
        let option = format!("compat={compat}");
        for image in [q, c] {
            qemu(
                d,
                &["create", "-q", "-f", "qcow2", "-o", &option, image, "64M"],
            );
        }
        qemu(d, &["convert", "-n", "-O", "qcow2", "src.qcow2", q]);
        let out = personality(d, &["convert", "-n", "-O", "qcow2", "src.qcow2", c]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            qemu_map_shape(&d.join(c)),
            qemu_map_shape(&d.join(q)),
            "compat={compat}"
        );
        assert_qemu_check_clean(&d.join(c), "convert");
    }
}

#[test]
fn convert_with_more_readers_than_buffers_finishes_for_every_output() {
    // With 2 MiB requests the pipeline keeps at most 8 buffers; `-m 16` (and 9) once started
    // more reader threads than that, and the readers left without a buffer at the end waited
    // forever. `timeout` turns such a hang into a failure (exit 124).
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu(d, &["create", "-q", "-f", "qcow2", "src.qcow2", "40M"]);
    qemu_io_in(
        d,
        "src.qcow2",
        &[
            "write -P 0x11 0 9M",
            "write -P 0x22 13M 5M",
            "write -P 0x33 30M 10M",
        ],
    );
    let bin = crate::util::cowclone_bin();
    for output in ["raw", "qcow2", "vdi"] {
        for m in ["16", "9"] {
            let out = format!("out-{m}.{output}");
            let args = [
                "120",
                bin.to_str().unwrap(),
                "convert",
                "-m",
                m,
                "-f",
                "qcow2",
                "-O",
                output,
                "src.qcow2",
                &out,
            ];
            let run = tool_in("timeout", d, &args);
            assert!(
                run.status.success(),
                "convert -m {m} -O {output} did not finish well: {}",
                crate::util::describe(&run)
            );
            // qemu-img compare exits 0 only for identical contents.
            qemu(
                d,
                &["compare", "-f", "qcow2", "-F", output, "src.qcow2", &out],
            );
        }
    }
}
