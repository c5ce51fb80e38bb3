//! The libvirt driver: a domain XML whose disk carries the whole `<backingStore>` chain (formats
//! pinned, so libvirt probes nothing), and the `virsh` command lines that define, start, shut
//! down, destroy and undefine it, on this host or another (`--connect URI`).

use std::path::Path;

use quick_xml::events::BytesText;
use quick_xml::Writer;

use super::runner::Invocation;
use super::spec::{DiskLayer, Egress, VmSpec};
use super::{Result, VmError};

fn xml_error(e: impl std::fmt::Display) -> VmError {
    VmError::Invalid(format!("building the domain XML: {e}"))
}

fn format_name(layer: &DiskLayer) -> &'static str {
    layer.format.name()
}

/// Writes one `<source>`/`<format>`/`<backingStore>` level for `layers[0]` and recurses below.
fn write_store(w: &mut Writer<Vec<u8>>, layers: &[DiskLayer]) -> Result<()> {
    let Some((layer, below)) = layers.split_first() else {
        // The bottom of the chain: an empty <backingStore/> says "nothing below", so libvirt
        // does not look into the image for more.
        w.create_element("backingStore")
            .write_empty()
            .map_err(xml_error)?;
        return Ok(());
    };
    let path = layer.path.to_string_lossy();
    w.create_element("format")
        .with_attribute(("type", format_name(layer)))
        .write_empty()
        .map_err(xml_error)?;
    w.create_element("source")
        .with_attribute(("file", path.as_ref()))
        .write_empty()
        .map_err(xml_error)?;
    if below.is_empty() {
        return write_store(w, below);
    }
    w.create_element("backingStore")
        .with_attribute(("type", "file"))
        .write_inner_content(|w| {
            write_store(w, below).map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok::<(), std::io::Error>(())
        })
        .map_err(xml_error)?;
    Ok(())
}

/// The domain XML for `spec` (kvm or qemu domain type by `kvm`). The domain has no network
/// interface, which keeps the default `--egress deny`; port forwards and egress destinations
/// are refused rather than dropped (the qemu driver has them).
pub fn domain_xml(spec: &VmSpec, kvm: bool) -> Result<String> {
    domain_xml_with_serial(spec, kvm, &spec.serial_log())
}

/// [`domain_xml`] with the serial console written to `serial_log` (a path on the host that
/// runs the domain: for a clone on a remote host, a file in its pool).
pub fn domain_xml_with_serial(spec: &VmSpec, kvm: bool, serial_log: &Path) -> Result<String> {
    let top = spec
        .disks
        .first()
        .ok_or_else(|| VmError::Invalid("no disk to boot from".into()))?;
    if !spec.ingress.is_empty() || spec.egress != Egress::Deny {
        return Err(VmError::Invalid(
            "the libvirt driver gives the VM no network: --ingress and --egress allow need \
             --driver qemu"
                .into(),
        ));
    }
    let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
    w.create_element("domain")
        .with_attribute(("type", if kvm { "kvm" } else { "qemu" }))
        .write_inner_content(|w| {
            w.create_element("name")
                .write_text_content(BytesText::new(&spec.name))?;
            w.create_element("memory")
                .with_attribute(("unit", "KiB"))
                .write_text_content(BytesText::new(&(spec.memory / 1024).to_string()))?;
            w.create_element("vcpu")
                .write_text_content(BytesText::new(&spec.cpus.to_string()))?;
            // ACPI, so that `virsh shutdown` (a power-button press) reaches the guest.
            w.create_element("features").write_inner_content(|w| {
                w.create_element("acpi").write_empty()?;
                w.create_element("apic").write_empty()?;
                Ok::<(), std::io::Error>(())
            })?;
            w.create_element("on_poweroff")
                .write_text_content(BytesText::new("destroy"))?;
            w.create_element("os").write_inner_content(|w| {
                w.create_element("type")
                    .with_attribute(("arch", "x86_64"))
                    .write_text_content(BytesText::new("hvm"))?;
                if let Some(boot) = &spec.kernel {
                    w.create_element("kernel")
                        .write_text_content(BytesText::new(&boot.kernel.to_string_lossy()))?;
                    if let Some(initrd) = &boot.initrd {
                        w.create_element("initrd")
                            .write_text_content(BytesText::new(&initrd.to_string_lossy()))?;
                    }
                    if let Some(append) = &boot.append {
                        w.create_element("cmdline")
                            .write_text_content(BytesText::new(append))?;
                    }
                }
                Ok::<(), std::io::Error>(())
            })?;
            w.create_element("devices").write_inner_content(|w| {
                w.create_element("disk")
                    .with_attribute(("type", "file"))
                    .with_attribute(("device", "disk"))
                    .write_inner_content(|w| {
                        w.create_element("driver")
                            .with_attribute(("name", "qemu"))
                            .with_attribute(("type", format_name(top)))
                            .write_empty()?;
                        w.create_element("source")
                            .with_attribute(("file", top.path.to_string_lossy().as_ref()))
                            .write_empty()?;
                        let below = &spec.disks[1..];
                        if below.is_empty() {
                            w.create_element("backingStore").write_empty()?;
                        } else {
                            w.create_element("backingStore")
                                .with_attribute(("type", "file"))
                                .write_inner_content(|w| {
                                    write_store(w, below)
                                        .map_err(|e| std::io::Error::other(e.to_string()))
                                })?;
                        }
                        w.create_element("target")
                            .with_attribute(("dev", "vda"))
                            .with_attribute(("bus", "virtio"))
                            .write_empty()?;
                        Ok::<(), std::io::Error>(())
                    })?;
                for (j, extra) in spec.extra_drives.iter().enumerate() {
                    let dev = format!("vd{}", char::from(b'b' + j as u8));
                    w.create_element("disk")
                        .with_attribute(("type", "file"))
                        .with_attribute(("device", "disk"))
                        .write_inner_content(|w| {
                            w.create_element("driver")
                                .with_attribute(("name", "qemu"))
                                .with_attribute(("type", "raw"))
                                .write_empty()?;
                            w.create_element("source")
                                .with_attribute(("file", extra.to_string_lossy().as_ref()))
                                .write_empty()?;
                            w.create_element("target")
                                .with_attribute(("dev", dev.as_str()))
                                .with_attribute(("bus", "virtio"))
                                .write_empty()?;
                            w.create_element("readonly").write_empty()?;
                            Ok::<(), std::io::Error>(())
                        })?;
                }
                w.create_element("serial")
                    .with_attribute(("type", "file"))
                    .write_inner_content(|w| {
                        w.create_element("source")
                            .with_attribute(("path", serial_log.to_string_lossy().as_ref()))
                            .write_empty()?;
                        Ok::<(), std::io::Error>(())
                    })?;
                Ok::<(), std::io::Error>(())
            })?;
            Ok::<(), std::io::Error>(())
        })
        .map_err(xml_error)?;
    let mut xml = String::from_utf8(w.into_inner()).map_err(xml_error)?;
    xml.push('\n');
    Ok(xml)
}

/// `virsh` command lines for one domain, on the local host or `connect` (e.g.
/// `qemu+ssh://host/system`).
#[derive(Debug, Clone, Default)]
pub struct Virsh {
    /// The libvirt URI, if not the default.
    pub connect: Option<String>,
}

impl Virsh {
    fn command(&self, verb: &str, argument: &str) -> Invocation {
        let mut args = Vec::new();
        if let Some(uri) = &self.connect {
            args.extend(["--connect".to_owned(), uri.clone()]);
        }
        args.extend([verb.to_owned(), argument.to_owned()]);
        Invocation::new("virsh", args)
    }

    /// `virsh -q [--connect URI] ARGS…`: quiet (no blank line after a command's output), for
    /// the pool and volume commands of remote hosts ([`crate::remote`]).
    pub fn quiet(&self, args: &[&str]) -> Invocation {
        let mut all = vec!["-q".to_owned()];
        if let Some(uri) = &self.connect {
            all.extend(["--connect".to_owned(), uri.clone()]);
        }
        all.extend(args.iter().map(|a| (*a).to_owned()));
        Invocation::new("virsh", all)
    }

    /// `virsh define XMLFILE`.
    pub fn define(&self, xml_file: &str) -> Invocation {
        self.command("define", xml_file)
    }
    /// `virsh start NAME`.
    pub fn start(&self, name: &str) -> Invocation {
        self.command("start", name)
    }
    /// `virsh shutdown NAME` (ACPI).
    pub fn shutdown(&self, name: &str) -> Invocation {
        self.command("shutdown", name)
    }
    /// `virsh destroy NAME` (hard stop).
    pub fn destroy(&self, name: &str) -> Invocation {
        self.command("destroy", name)
    }
    /// `virsh domstate NAME` (prints `running`, `shut off`, …).
    pub fn domstate(&self, name: &str) -> Invocation {
        self.command("domstate", name)
    }
    /// `virsh undefine NAME`.
    pub fn undefine(&self, name: &str) -> Invocation {
        self.command("undefine", name)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use imagefmt::ImageFormat;
    use quick_xml::events::Event;
    use quick_xml::Reader;

    use super::*;
    use crate::vm::spec::{Accel, Egress};

    fn layer(path: &str, format: ImageFormat) -> DiskLayer {
        DiskLayer {
            path: PathBuf::from(path),
            format,
            read_only: false,
        }
    }

    /// The `(format, source)` pairs along the disk's chain, read back with an XML parser, and
    /// whether the chain ends in an empty `<backingStore/>`.
    fn chain_of(xml: &str) -> (Vec<(String, String)>, bool) {
        let mut reader = Reader::from_str(xml);
        let (mut chain, mut format, mut in_disk, mut closed) = (Vec::new(), None, false, false);
        loop {
            match reader.read_event().unwrap() {
                Event::Eof => break,
                Event::Start(e) if e.name().as_ref() == b"disk" => in_disk = chain.is_empty(),
                Event::End(e) if e.name().as_ref() == b"disk" => in_disk = false,
                Event::Empty(e) if in_disk => {
                    let attr = |name: &[u8]| {
                        e.attributes()
                            .flatten()
                            .find(|a| a.key.as_ref() == name)
                            .map(|a| a.unescape_value().unwrap().into_owned())
                    };
                    match e.name().as_ref() {
                        b"driver" | b"format" => format = attr(b"type"),
                        b"source" => chain.push((format.take().unwrap(), attr(b"file").unwrap())),
                        b"backingStore" => closed = true,
                        _ => {}
                    }
                }
                _ => {}
            }
        }
        (chain, closed)
    }

    #[test]
    fn the_disk_carries_the_whole_chain_with_formats_pinned() {
        let spec = VmSpec {
            name: "web<1>".into(),
            run_dir: "/h/clones/web".into(),
            disks: vec![
                layer("/h/clones/web/disk.qcow2", ImageFormat::Qcow2),
                layer("/h/clones/mid/disk.qcow2", ImageFormat::Qcow2),
                layer("/srv/base & co.raw", ImageFormat::Raw),
            ],
            memory: 1 << 30,
            cpus: 4,
            accel: Accel::Tcg,
            ingress: vec![],
            egress: Egress::Deny,
            kernel: None,
            extra_drives: vec![],
            extra_serial_logs: vec![],
            egress_relay: None,
        };
        let xml = domain_xml(&spec, false).unwrap();
        let (chain, closed) = chain_of(&xml);
        assert_eq!(
            chain,
            [
                ("qcow2".to_owned(), "/h/clones/web/disk.qcow2".to_owned()),
                ("qcow2".to_owned(), "/h/clones/mid/disk.qcow2".to_owned()),
                ("raw".to_owned(), "/srv/base & co.raw".to_owned()),
            ],
            "{xml}"
        );
        assert!(closed, "the chain ends in an empty backingStore: {xml}");
        assert!(xml.contains("<name>web&lt;1&gt;</name>"), "{xml}");
        assert!(
            xml.contains(r#"<memory unit="KiB">1048576</memory>"#),
            "{xml}"
        );
        assert!(xml.contains(r#"<domain type="qemu">"#), "{xml}");
        let virsh = Virsh {
            connect: Some("qemu+ssh://host/system".into()),
        };
        assert_eq!(
            virsh.define("/h/clones/web/domain.xml").shell_line(),
            "virsh --connect qemu+ssh://host/system define /h/clones/web/domain.xml"
        );
        assert_eq!(
            Virsh::default().destroy("web").shell_line(),
            "virsh destroy web"
        );
        assert!(
            !xml.contains("<interface"),
            "no network: egress deny holds: {xml}"
        );
        // What the domain cannot honour is refused, not dropped.
        let forwarded = VmSpec {
            ingress: vec!["8080:80".parse().unwrap()],
            ..spec.clone()
        };
        assert!(domain_xml(&forwarded, false).is_err());
        let allowed = VmSpec {
            egress: "allow:10.0.0.1:443".parse().unwrap(),
            ..spec
        };
        assert!(domain_xml(&allowed, false).is_err());
    }
}
