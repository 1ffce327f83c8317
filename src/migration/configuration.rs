//! The CONFIGURATION section: QEMU's `vmstate_configuration` (machine name, optional
//! target-page-bits, capabilities and UUID subsections).

use super::value::Value;
use super::vmstate::{Count, Field, FieldType, VMStateDescription};

/// QEMU's `vmstate_configuration`: machine name and optional subsections.
pub fn configuration_vmsd() -> VMStateDescription {
    VMStateDescription::new("configuration", 1, 1)
        .field(Field::uint("len", 4))
        .field(Field::new(
            "name",
            FieldType::VBuffer {
                len_field: "len".into(),
            },
        ))
        .subsection(
            VMStateDescription::new("configuration/target-page-bits", 1, 1)
                .field(Field::uint("target_page_bits", 4)),
            None,
        )
        .subsection(
            VMStateDescription::new("configuration/capabilities", 1, 1)
                .field(Field::uint("caps_count", 4))
                .field(
                    Field::new("capabilities", FieldType::Capability)
                        .count(Count::FromField("caps_count".into())),
                ),
            None,
        )
        .subsection(
            VMStateDescription::new("configuration/uuid", 1, 1)
                .field(Field::uint("uuid.data", 1).count(Count::Fixed(16))),
            None,
        )
}

/// The configuration value for machine `name`.
pub fn configuration_value(name: &str) -> Value {
    Value::structure([
        ("len", Value::u32(name.len() as u32)),
        ("name", Value::Bytes(name.as_bytes().to_vec())),
    ])
}

/// The configuration value for machine `name` announcing `capabilities` (QEMU's
/// `configuration/capabilities` subsection; none given = no subsection, as QEMU sends when no
/// capability needs checking).
pub fn configuration_value_with_capabilities(name: &str, capabilities: &[String]) -> Value {
    let mut v = configuration_value(name);
    if capabilities.is_empty() {
        return v;
    }
    let caps = Value::structure([
        ("caps_count", Value::u32(capabilities.len() as u32)),
        (
            "capabilities",
            Value::Array(
                capabilities
                    .iter()
                    .map(|c| Value::Bytes(c.as_bytes().to_vec()))
                    .collect(),
            ),
        ),
    ]);
    if let Value::Struct(fields) = &mut v {
        fields.push(("configuration/capabilities".into(), caps));
    }
    v
}

/// The capability names a configuration value announces.
pub fn configuration_capabilities(v: &Value) -> Vec<String> {
    match v
        .get("configuration/capabilities")
        .and_then(|c| c.get("capabilities"))
    {
        Some(Value::Array(caps)) => caps
            .iter()
            .filter_map(Value::as_bytes)
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect(),
        _ => Vec::new(),
    }
}

/// The machine name of a configuration value.
pub fn configuration_name(v: &Value) -> String {
    v.get("name")
        .and_then(Value::as_bytes)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::qemu_file::{QemuFileReader, QemuFileWriter};

    #[test]
    fn machine_name_and_capabilities_round_trip() {
        let mut v = configuration_value("pc-q35-7.2");
        if let Value::Struct(f) = &mut v {
            f.push((
                "configuration/capabilities".into(),
                Value::structure([
                    ("caps_count", Value::u32(1)),
                    (
                        "capabilities",
                        Value::Array(vec![Value::Bytes(b"x-ignore-shared".to_vec())]),
                    ),
                ]),
            ));
        }
        let mut w = QemuFileWriter::new(Vec::new());
        configuration_vmsd().encode(&mut w, &v, None).unwrap();
        let bytes = w.into_inner().unwrap();
        assert_eq!(&bytes[..4], &10u32.to_be_bytes());
        assert_eq!(bytes[14], 0x05);
        let back = configuration_vmsd()
            .decode(&mut QemuFileReader::new(&bytes[..]), 1)
            .unwrap();
        assert_eq!(back, v);
        assert_eq!(configuration_name(&back), "pc-q35-7.2");
        assert_eq!(configuration_capabilities(&back), ["x-ignore-shared"]);
        assert_eq!(
            configuration_value_with_capabilities("pc-q35-7.2", &["x-ignore-shared".into()]),
            v
        );
        assert_eq!(
            configuration_value_with_capabilities("m", &[]),
            configuration_value("m")
        );
    }
}
