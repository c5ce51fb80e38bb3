//! Formats cowclone does not read (VMDK, VHD, VHDX, QED, qcow v1, LUKS, Parallels, DMG) are
//! recognised by their magic and refused by name by every command that reads an image, never
//! shown as raw. The images are made by `qemu-img create` (Debian package qemu-utils), and
//! `qemu-img info` confirms each is the format we expect to name; the DMG trailer is written by
//! hand (qemu cannot create DMG).

use std::path::{Path, PathBuf};

use crate::util::{cowclone, describe, qemu_img_ok, qemu_info_json};

/// One foreign image: the file, the label cowclone must name, the driver name qemu reports.
struct Foreign {
    path: PathBuf,
    label: &'static str,
    qemu_format: Option<&'static str>,
}

/// `qemu-img create` with `args` (format options included) for a 4 MiB image at `path`.
fn qemu_create(path: &Path, args: &[&str]) {
    let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"create", &"-q"];
    for a in args {
        all.push(a);
    }
    all.push(&path);
    all.push(&"4M");
    qemu_img_ok(&all);
}

fn make_foreign_images(dir: &Path) -> Vec<Foreign> {
    let mut out = Vec::new();
    let mut add = |name: &str, args: &[&str], label, qemu_format| {
        let path = dir.join(name);
        qemu_create(&path, args);
        out.push(Foreign {
            path,
            label,
            qemu_format,
        });
    };
    add("sparse.vmdk", &["-f", "vmdk"], "VMDK", Some("vmdk"));
    add(
        "descriptor.vmdk",
        &["-f", "vmdk", "-o", "subformat=monolithicFlat"],
        "VMDK",
        Some("vmdk"),
    );
    add("dynamic.vhd", &["-f", "vpc"], "VHD (vpc)", Some("vpc"));
    // A fixed VHD has its footer only at the end; qemu probes only the start, so it is
    // confirmed below with `-f vpc` instead.
    add(
        "fixed.vhd",
        &["-f", "vpc", "-o", "subformat=fixed"],
        "VHD (vpc)",
        None,
    );
    add("disk.vhdx", &["-f", "vhdx"], "VHDX", Some("vhdx"));
    add("disk.qed", &["-f", "qed"], "QED", Some("qed"));
    add(
        "disk.qcow",
        &["-f", "qcow"],
        "qcow (version 1)",
        Some("qcow"),
    );
    add(
        "disk.luks",
        &[
            "-f",
            "luks",
            "--object",
            "secret,id=sec0,data=cowclone-test",
            "-o",
            "key-secret=sec0,iter-time=10",
        ],
        "LUKS",
        Some("luks"),
    );
    add(
        "disk.hdd",
        &["-f", "parallels"],
        "Parallels",
        Some("parallels"),
    );
    // DMG: a UDIF trailer ("koly") in the last 512 bytes of a file.
    let dmg = dir.join("disk.img");
    let mut bytes = vec![0x5au8; 64 * 1024];
    let trailer = bytes.len() - 512;
    bytes[trailer..trailer + 4].copy_from_slice(b"koly");
    std::fs::write(&dmg, bytes).unwrap();
    out.push(Foreign {
        path: dmg,
        label: "DMG",
        qemu_format: None,
    });
    out
}

#[test]
fn foreign_formats_are_refused_by_name_by_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let images = make_foreign_images(dir.path());
    // qemu-img agrees on what each file is.
    for image in &images {
        if let Some(format) = image.qemu_format {
            let info = qemu_info_json(&image.path);
            assert_eq!(info["format"], format, "{}", image.path.display());
        }
    }
    let fixed = dir.path().join("fixed.vhd");
    qemu_img_ok(&[&"info", &"-f", &"vpc", &fixed]);

    let out = dir.path().join("out.img");
    for image in &images {
        let path = &image.path;
        let want = format!(
            "{} is a {} image; cowclone reads qcow2, VDI and raw",
            path.display(),
            image.label
        );
        let commands: [Vec<&dyn AsRef<std::ffi::OsStr>>; 5] = [
            vec![&"info", path],
            vec![&"info", &"--output", &"json", path],
            vec![&"convert", &"-O", &"qcow2", path, &out],
            vec![&"check", path],
            vec![&"map", path],
        ];
        for args in commands {
            let output = cowclone(&args);
            let stderr = String::from_utf8_lossy(&output.stderr);
            let shown: Vec<String> = args
                .iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect();
            assert!(
                !output.status.success() && stderr.contains(&want),
                "cowclone {shown:?} must refuse with {want:?}: {}",
                describe(&output)
            );
            assert_eq!(
                stderr.trim_end(),
                format!("cowclone: {want}"),
                "cowclone {shown:?}: one line"
            );
            let stdout = String::from_utf8_lossy(&output.stdout);
            assert!(
                !stdout.contains("raw"),
                "cowclone {shown:?} shows the image as raw: {stdout}"
            );
            assert!(!out.exists(), "convert made {} anyway", out.display());
        }
    }
}
