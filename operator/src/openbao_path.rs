//! One rule for every OpenBao path or name KubeBao builds from a spec (secret paths, mounts,
//! role names, policy names, policy rule paths): checked segment by segment, so no spec can
//! address a path outside the one it names (`secret/data/../../sys/...` is refused, not
//! normalised by a URL library into `sys/...`).
//!
//! The CRD schemas carry the same rule as patterns ([`NAME_PATTERN`] and friends), so the API
//! server refuses such objects with a message naming the field; [`check`] repeats it for objects
//! written around the API server and for names that come from elsewhere (a default, the
//! status).

/// One segment: allowed characters, and neither `.` nor `..` (RE2 syntax, as the API server
/// evaluates CRD patterns).
macro_rules! segment {
    () => {
        r"([A-Za-z0-9_+@=-][A-Za-z0-9_.+@=-]*|\.[A-Za-z0-9_+@=-][A-Za-z0-9_.+@=-]*|\.\.[A-Za-z0-9_.+@=-]+)"
    };
}

/// CRD pattern of a name: one segment.
pub const NAME_PATTERN: &str = concat!("^", segment!(), "$");
/// CRD pattern of a mount: one or more segments.
pub const PATH_PATTERN: &str = concat!("^", segment!(), "(/", segment!(), ")*$");
/// CRD pattern of a KV secret path: a mount and at least one more segment.
pub const SECRET_PATH_PATTERN: &str = concat!("^", segment!(), "(/", segment!(), ")+$");
/// CRD pattern of a policy rule path: segments, optionally ending in `/` and/or `*` (prefix).
pub const GLOB_PATTERN: &str = concat!("^", segment!(), "(/", segment!(), ")*/?\\*?$");

/// Longest name (role, policy) accepted.
pub const MAX_NAME: usize = 128;
/// Longest path (secret path, mount, rule path) accepted.
pub const MAX_PATH: usize = 512;

/// What a value must look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// One segment (role name, policy name).
    Name,
    /// One or more segments (mount, secret path).
    Path,
    /// A policy rule path: segments, optionally ending in `/` and/or `*`.
    Glob,
}

/// A value that is not a safe OpenBao path or name; the message names the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} {value:?} {problem}")]
pub struct PathError {
    /// The spec field, e.g. `spec.secretPath`.
    pub field: String,
    /// The value as given (a path or a name, never a secret).
    pub value: String,
    /// What is wrong and what to write instead.
    pub problem: String,
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_.+@=-".contains(c)
}

/// Checks `value` (the spec field `field`) against `shape`.
pub fn check(field: &str, value: &str, shape: Shape) -> Result<(), PathError> {
    let problem = problem(value, shape);
    match problem {
        None => Ok(()),
        Some(problem) => Err(PathError {
            field: field.to_string(),
            value: value.chars().take(MAX_PATH + 1).collect(),
            problem,
        }),
    }
}

fn problem(value: &str, shape: Shape) -> Option<String> {
    let max = if shape == Shape::Name {
        MAX_NAME
    } else {
        MAX_PATH
    };
    if value.len() > max {
        return Some(format!("is longer than {max} characters"));
    }
    let mut body = value;
    if shape == Shape::Glob {
        body = body.strip_suffix('*').unwrap_or(body);
        if body.len() > 1 {
            body = body.strip_suffix('/').unwrap_or(body);
        }
    }
    if body.is_empty() {
        return Some("is empty".into());
    }
    if body.starts_with('/') {
        return Some("starts with /: write it without the leading slash".into());
    }
    if body.ends_with('/') {
        return Some("ends with /: write it without the trailing slash".into());
    }
    if shape == Shape::Name && body.contains('/') {
        return Some("holds a /: it is one name, not a path".into());
    }
    for segment in body.split('/') {
        if let Some(problem) = segment_problem(segment) {
            return Some(problem);
        }
    }
    None
}

fn segment_problem(segment: &str) -> Option<String> {
    if segment.is_empty() {
        return Some("has an empty segment (//)".into());
    }
    if segment == "." || segment == ".." {
        return Some(format!(
            "has a {segment:?} segment: a path may not step outside the one it names"
        ));
    }
    segment.chars().find(|c| !allowed(*c)).map(|c| {
        format!(
            "holds {c:?}: only letters, digits and _ . + @ = - are allowed (and / between segments)"
        )
    })
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
    fn accepts_ordinary_paths_and_names() {
        for (value, shape) in [
            ("secret/data/team/app", Shape::Path),
            ("kubernetes", Shape::Path),
            ("clusters/prod/kubernetes", Shape::Path),
            ("team-a", Shape::Name),
            ("a..b", Shape::Name),
            (".hidden", Shape::Name),
            ("secret/data/team/*", Shape::Glob),
            ("secret/data/te*", Shape::Glob),
            ("secret/+/team", Shape::Glob),
            ("secret/", Shape::Glob),
        ] {
            assert_eq!(check("f", value, shape), Ok(()), "{value}");
        }
    }

    #[test]
    fn refuses_every_way_out_of_the_named_path() {
        for (value, shape, says) in [
            (
                "secret/data/../../sys/policies/acl/x",
                Shape::Path,
                "\"..\" segment",
            ),
            ("secret/./data", Shape::Path, "\".\" segment"),
            ("/secret/data/x", Shape::Path, "starts with /"),
            ("secret/data/x/", Shape::Path, "ends with /"),
            ("secret//x", Shape::Path, "empty segment"),
            ("..", Shape::Name, "\"..\" segment"),
            ("a/b", Shape::Name, "one name"),
            ("secret/data/../*", Shape::Glob, "\"..\" segment"),
            ("*", Shape::Glob, "is empty"),
            ("a b", Shape::Path, "holds ' '"),
            ("a%2e%2e", Shape::Path, "holds '%'"),
            ("a?list=true", Shape::Path, "holds '?'"),
            ("a\nb", Shape::Path, "holds '\\n'"),
            ("", Shape::Name, "is empty"),
        ] {
            let e = check("spec.x", value, shape).unwrap_err();
            assert!(e.to_string().starts_with("spec.x "), "{e}");
            assert!(e.to_string().contains(says), "{value:?}: {e}");
        }
        let long = "a".repeat(MAX_NAME + 1);
        assert!(check("f", &long, Shape::Name).is_err());
    }

    // The CRD patterns and `check` agree: every value generated from a schema pattern (within
    // its length) is accepted, and everything `check` accepts has no way out.
    proptest! {
        #[test]
        fn every_schema_valid_path_is_accepted(value in schema(SECRET_PATH_PATTERN)) {
            prop_assume!(value.len() <= MAX_PATH);
            prop_assert_eq!(check("spec.secretPath", &value, Shape::Path), Ok(()));
        }

        #[test]
        fn every_schema_valid_glob_and_name_is_accepted(
            glob in schema(GLOB_PATTERN),
            name in schema(NAME_PATTERN),
            mount in schema(PATH_PATTERN),
        ) {
            prop_assume!(glob.len() <= MAX_PATH && name.len() <= MAX_NAME && mount.len() <= MAX_PATH);
            prop_assert_eq!(check("spec.rules[0].path", &glob, Shape::Glob), Ok(()));
            prop_assert_eq!(check("spec.roles[0].name", &name, Shape::Name), Ok(()));
            prop_assert_eq!(check("spec.roles[0].mount", &mount, Shape::Path), Ok(()));
        }

        #[test]
        fn any_text_is_answered_without_panic_and_accepted_text_has_no_way_out(
            value in "[a-z./+*%@ \\n-]{0,40}",
            shape in prop_oneof![Just(Shape::Name), Just(Shape::Path), Just(Shape::Glob)],
        ) {
            match check("spec.field", &value, shape) {
                Ok(()) => {
                    let body = value.trim_end_matches('*').trim_end_matches('/');
                    prop_assert!(!body.starts_with('/'));
                    prop_assert!(body.split('/').all(|s| !s.is_empty() && s != "." && s != ".."));
                    prop_assert!(body.chars().all(|c| allowed(c) || c == '/'));
                }
                Err(e) => prop_assert!(e.to_string().starts_with("spec.field ")),
            }
        }
    }
}
