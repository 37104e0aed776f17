//! The bounds of the spec fields the operator parses, in one place: the CRD schemas use the
//! patterns (so the API server refuses a bad value with a message naming the field), and the
//! controllers use the functions (so an object written around the API server, e.g. straight
//! into etcd or under an older CRD, gets the same answer instead of a panic). OpenBao paths and
//! names are in `crate::openbao_path`.

/// A Kubernetes object name (DNS subdomain).
pub const KUBE_NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$";
/// Longest Kubernetes object name.
pub const MAX_KUBE_NAME: usize = 253;
/// A namespace name (DNS label).
pub const NAMESPACE_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A Secret key: letters, digits, `-`, `_`, `.`; not `.`, `..` or starting with `..`.
pub const SECRET_KEY_PATTERN: &str = r"^\.?[-_a-zA-Z0-9][-._a-zA-Z0-9]*$";
/// A Secret type (`Opaque`, `kubernetes.io/tls`, `example.com/kind`).
pub const SECRET_TYPE_PATTERN: &str = r"^[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?$";
/// A refresh interval: Go duration segments, at most nine digits each (so no value overflows).
pub const INTERVAL_PATTERN: &str = r"^([0-9]{1,9}(\.[0-9]{1,9})?(ms|s|m|h))+$";
/// A role TTL: whole seconds, minutes or hours, at most nine digits each.
pub const TTL_PATTERN: &str = r"^([0-9]{1,9}(s|m|h))+$";
/// Longest duration text.
pub const MAX_DURATION_TEXT: usize = 32;
/// A BaoSecret source's name (`spec.sources[].name`): a template variable, so an identifier.
pub const SOURCE_NAME_PATTERN: &str = r"^[a-z][a-z0-9_]*$";
/// Longest source name.
pub const MAX_SOURCE_NAME: usize = 63;

/// Secret types Kubernetes itself acts on, refused as BaoSecret targets: a
/// `service-account-token` Secret makes the token controller mint a token for the ServiceAccount
/// it names, a `bootstrap.kubernetes.io/token` Secret (in kube-system) lets a node join the
/// cluster. Creating a BaoSecret must not give more than creating the Secret would.
/// (The CRD's CEL rule on `target.type` lists the same types; a unit test keeps them equal.)
pub const FORBIDDEN_TARGET_TYPES: [&str; 2] = [
    "kubernetes.io/service-account-token",
    "bootstrap.kubernetes.io/token",
];

/// Checks a Kubernetes object name (`field` names it in the error).
pub fn kube_name(field: &str, value: &str) -> Result<(), String> {
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok = value.len() <= MAX_KUBE_NAME
        && edge_ok(value.chars().next())
        && edge_ok(value.chars().last())
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field} {:?} is not a Kubernetes name: lower-case letters, digits, - and . (starting and ending with a letter or digit), at most {MAX_KUBE_NAME} characters",
            shorten(value)
        ))
    }
}

/// Checks a Secret key (`field` names it in the error).
pub fn secret_key(field: &str, key: &str) -> Result<(), String> {
    let body = key.strip_prefix('.').unwrap_or(key);
    let ok = key.len() <= MAX_KUBE_NAME
        && body
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field} {:?} is not a valid Secret key: letters, digits, - _ and . only, not . or .. (rename it with spec.keys: [{{from, to}}])",
            shorten(key)
        ))
    }
}

/// Checks a source name (`field` names it in the error): see [`SOURCE_NAME_PATTERN`].
pub fn source_name(field: &str, value: &str) -> Result<(), String> {
    let ok = value.len() <= MAX_SOURCE_NAME
        && value.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field} {:?} is not a source name: a lower-case letter, then lower-case letters, digits and _, at most {MAX_SOURCE_NAME} characters (templates use it as a variable: {{{{ name.key }}}})",
            shorten(value)
        ))
    }
}

/// Checks `target.type`: a Secret type, and not one Kubernetes acts on.
pub fn target_type(field: &str, value: &str) -> Result<(), TargetTypeError> {
    if FORBIDDEN_TARGET_TYPES.contains(&value) {
        return Err(TargetTypeError::Forbidden(format!(
            "{field} {value:?} is refused: Kubernetes itself acts on Secrets of this type (it mints credentials or lets nodes join), so a BaoSecret may not write one; use Opaque or another type"
        )));
    }
    let ok = value.len() <= MAX_KUBE_NAME
        && value
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && value
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if ok {
        Ok(())
    } else {
        Err(TargetTypeError::Invalid(format!(
            "{field} {:?} is not a Secret type such as Opaque or kubernetes.io/tls",
            shorten(value)
        )))
    }
}

/// Why a target type is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetTypeError {
    /// A type Kubernetes acts on (see [`FORBIDDEN_TARGET_TYPES`]).
    Forbidden(String),
    /// Not a Secret type at all.
    Invalid(String),
}

/// A value cut short for an error message.
fn shorten(value: &str) -> String {
    value.chars().take(MAX_KUBE_NAME + 1).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::string::string_regex;

    /// Strings matching a CRD pattern (proptest generates from the unanchored pattern).
    fn schema(pattern: &str) -> proptest::string::RegexGeneratorStrategy<String> {
        string_regex(pattern.trim_start_matches('^').trim_end_matches('$')).unwrap()
    }

    #[test]
    fn names_keys_and_types() {
        assert!(kube_name("f", "app-1.web").is_ok());
        for bad in [
            "",
            "App",
            "-a",
            "a-",
            "a_b",
            "ns/name",
            "system:serviceaccount:x:y",
        ] {
            let e = kube_name("spec.serviceAccountName", bad).unwrap_err();
            assert!(e.starts_with("spec.serviceAccountName "), "{e}");
        }
        for good in ["password", ".env", "tls.crt", "a_b-c"] {
            assert!(secret_key("k", good).is_ok(), "{good}");
        }
        for bad in [".", "..", "..a", "a/b", "", "a b"] {
            assert!(secret_key("k", bad).is_err(), "{bad:?}");
        }
        for good in ["db", "cache_2", "a"] {
            assert!(source_name("s", good).is_ok(), "{good}");
        }
        for bad in ["", "Db", "2db", "_db", "db-1", "db.x", &"a".repeat(64)] {
            let e = source_name("spec.sources[0].name", bad).unwrap_err();
            assert!(e.starts_with("spec.sources[0].name "), "{e}");
        }
        assert!(target_type("t", "kubernetes.io/tls").is_ok());
        assert!(target_type("t", "Opaque").is_ok());
        for forbidden in FORBIDDEN_TARGET_TYPES {
            assert!(matches!(
                target_type("spec.target.type", forbidden),
                Err(TargetTypeError::Forbidden(m)) if m.starts_with("spec.target.type ")
            ));
        }
        assert!(matches!(
            target_type("t", "a\"b"),
            Err(TargetTypeError::Invalid(_))
        ));
    }

    #[test]
    fn the_crd_refuses_the_same_target_types() {
        let yaml = crate::api::all_yaml();
        let rule = yaml
            .lines()
            .find(|l| l.contains("rule:") && l.contains("service-account-token"))
            .expect("the CEL rule on target.type");
        for t in FORBIDDEN_TARGET_TYPES {
            assert!(rule.contains(&format!("'{t}'")), "{t} missing from {rule}");
        }
    }

    #[test]
    fn the_crd_checks_template_keys_with_the_secret_key_pattern() {
        let yaml = crate::api::all_yaml();
        let rule = yaml
            .lines()
            .find(|l| l.contains("rule:") && l.contains("k.matches("))
            .expect("the CEL rule on template.data keys");
        // A CEL string literal doubles the regex's backslashes.
        let literal = SECRET_KEY_PATTERN.replace('\\', "\\\\");
        assert!(rule.contains(&format!("'{literal}'")), "{rule}");
    }

    proptest! {
        #[test]
        fn any_text_is_answered_without_panic(text in "[a-z0-9./_ -]{0,40}") {
            let _ = kube_name("f", &text);
            let _ = secret_key("f", &text);
            let _ = target_type("f", &text);
            let _ = source_name("f", &text);
        }

        #[test]
        fn schema_valid_names_pass(
            name in schema(KUBE_NAME_PATTERN),
            key in schema(SECRET_KEY_PATTERN),
            type_ in schema(SECRET_TYPE_PATTERN),
            source in schema(SOURCE_NAME_PATTERN),
        ) {
            prop_assume!(name.len() <= MAX_KUBE_NAME && key.len() <= MAX_KUBE_NAME && type_.len() <= MAX_KUBE_NAME);
            if source.len() <= MAX_SOURCE_NAME {
                prop_assert!(source_name("f", &source).is_ok());
            }
            prop_assert!(kube_name("f", &name).is_ok());
            prop_assert!(secret_key("f", &key).is_ok());
            prop_assume!(!FORBIDDEN_TARGET_TYPES.contains(&type_.as_str()));
            prop_assert!(target_type("f", &type_).is_ok());
        }
    }
}
