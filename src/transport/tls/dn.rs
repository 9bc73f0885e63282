//! A certificate's subject distinguished name as GnuTLS's `gnutls_x509_crt_get_dn` prints
//! it: QEMU compares that string with `tls-authz` (an `authz-simple` identity), so the
//! helper must produce the very same bytes. RDNs in the order the certificate encodes them,
//! joined by ","; the attributes of a multi-valued RDN joined by "+"; values escaped as RFC
//! 4514 says; a value that is no string type as "#" and the hex of its DER encoding.

use x509_parser::der_parser::asn1_rs::Tag;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::x509::AttributeTypeAndValue;

/// The subject DN of the DER certificate `der`; None when it does not parse.
pub(crate) fn distinguished_name(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut out = String::new();
    for (i, rdn) in cert.subject().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, atv) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            push_attribute(&mut out, atv);
        }
    }
    Some(out)
}

/// The string types GnuTLS decodes an attribute's value as: a value of another type
/// prints as "#" and its DER in hex (rcgen's UTF8String countryName does, in QEMU too).
#[derive(Clone, Copy)]
enum Expect {
    Printable,
    Ia5,
    /// X.520 DirectoryString: teletex, printable, universal, UTF-8 or BMP.
    Directory,
}

/// The short names GnuTLS knows (lib/x509/common.c, `_oid2str`) and the value types it
/// reads; other attributes print as the dotted OID and their DER in hex.
fn known(oid: &str) -> Option<(&'static str, Expect)> {
    use Expect::*;
    Some(match oid {
        "2.5.4.3" => ("CN", Directory),
        "2.5.4.4" => ("surName", Directory),
        "2.5.4.5" => ("serialNumber", Printable),
        "2.5.4.6" => ("C", Printable),
        "2.5.4.7" => ("L", Directory),
        "2.5.4.8" => ("ST", Directory),
        "2.5.4.9" => ("street", Directory),
        "2.5.4.10" => ("O", Directory),
        "2.5.4.11" => ("OU", Directory),
        "2.5.4.12" => ("title", Directory),
        "2.5.4.13" => ("description", Directory),
        "2.5.4.15" => ("businessCategory", Directory),
        "2.5.4.17" => ("postalCode", Directory),
        "2.5.4.20" => ("telephoneNumber", Printable),
        "2.5.4.41" => ("Name", Directory),
        "2.5.4.42" => ("givenName", Directory),
        "2.5.4.43" => ("initials", Directory),
        "2.5.4.44" => ("generationQualifier", Directory),
        "2.5.4.46" => ("dnQualifier", Printable),
        "2.5.4.65" => ("pseudonym", Directory),
        "0.9.2342.19200300.100.1.25" => ("DC", Ia5),
        "0.9.2342.19200300.100.1.1" => ("UID", Directory),
        "1.2.840.113549.1.9.1" => ("EMAIL", Ia5),
        _ => return None,
    })
}

fn push_attribute(out: &mut String, atv: &AttributeTypeAndValue<'_>) {
    let oid = atv.attr_type().to_id_string();
    let k = known(&oid);
    out.push_str(k.map_or(oid.as_str(), |(name, _)| name));
    out.push('=');
    match k.and_then(|(_, expect)| value_text(atv, expect)) {
        Some(s) => escape_into(out, &s),
        None => {
            // "#" + hex of the value's DER (tag, length, contents), as RFC 4514.
            let v = atv.attr_value();
            out.push('#');
            push_hex(out, &[u8::try_from(v.tag().0).unwrap_or(0xff)]);
            push_der_length(out, v.data.len());
            push_hex(out, v.data);
        }
    }
}

/// The value as text when its string type is one GnuTLS reads for the attribute.
fn value_text(atv: &AttributeTypeAndValue<'_>, expect: Expect) -> Option<String> {
    let v = atv.attr_value();
    let t = v.tag();
    let allowed: &[Tag] = match expect {
        Expect::Printable => &[Tag::PrintableString],
        Expect::Ia5 => &[Tag::Ia5String],
        Expect::Directory => &[
            Tag::TeletexString,
            Tag::PrintableString,
            Tag::UniversalString,
            Tag::Utf8String,
            Tag::BmpString,
        ],
    };
    if !allowed.contains(&t) {
        return None;
    }
    if t == Tag::BmpString {
        // UCS-2 big-endian, which GnuTLS converts to UTF-8.
        if v.data.len() % 2 != 0 {
            return None;
        }
        let units = v
            .data
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]));
        return char::decode_utf16(units)
            .collect::<Result<String, _>>()
            .ok();
    }
    if t == Tag::UniversalString {
        if v.data.len() % 4 != 0 {
            return None;
        }
        return v
            .data
            .chunks_exact(4)
            .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
    }
    std::str::from_utf8(v.data).ok().map(str::to_owned)
}

/// RFC 4514 section 2.4: the specials anywhere, '#' and ' ' at the start, ' ' at the end,
/// NUL as "\00".
fn escape_into(out: &mut String, s: &str) {
    let last = s.chars().count().saturating_sub(1);
    for (i, c) in s.chars().enumerate() {
        match c {
            ',' | '+' | '"' | '\\' | '<' | '>' | ';' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            _ => out.push(c),
        }
    }
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
}

fn push_der_length(out: &mut String, len: usize) {
    if len < 0x80 {
        push_hex(out, &[len as u8]);
    } else {
        let be = len.to_be_bytes();
        let skip = be.iter().take_while(|b| **b == 0).count();
        push_hex(out, &[0x80 | (be.len() - skip) as u8]);
        push_hex(out, &be[skip..]);
    }
}
