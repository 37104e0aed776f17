//! Rendering BaoPolicy rules to HCL, deterministically and without any way for a value to
//! change the policy's structure, and the ownership marker KubeBao keeps in every policy.
//!
//! The marker is the policy's first line: `# managed-by: kubebao.io BaoPolicy <uid>`, followed
//! by ` roles=<mount>/<name>,...` when the BaoPolicy owns Kubernetes-auth roles. OpenBao's
//! roles have no field for a note of their own (unknown fields are dropped), so the policy they
//! grant carries their ownership record. Only the first line is read: nothing in raw HCL (which
//! comes after it) can claim a role.

use crate::api::PolicyRule;
use crate::openbao_path::{self, Shape};

const MARKER_PREFIX: &str = "# managed-by: kubebao.io BaoPolicy ";
const ROLES_PREFIX: &str = "roles=";

/// The first line of every policy KubeBao writes, naming the owner and the roles it owns.
pub fn marker(uid: &str, roles: &[String]) -> String {
    if roles.is_empty() {
        format!("{MARKER_PREFIX}{uid}")
    } else {
        format!("{MARKER_PREFIX}{uid} {ROLES_PREFIX}{}", roles.join(","))
    }
}

/// The BaoPolicy uid in a policy's marker line, if KubeBao wrote it.
pub fn owner_uid(hcl: &str) -> Option<&str> {
    hcl.lines()
        .next()?
        .strip_prefix(MARKER_PREFIX)?
        .split_whitespace()
        .next()
}

/// The roles (`<mount>/<name>`) a policy's marker line records as owned by its BaoPolicy.
pub fn owned_roles(hcl: &str) -> Vec<String> {
    hcl.lines()
        .next()
        .and_then(|l| l.strip_prefix(MARKER_PREFIX))
        .and_then(|rest| {
            rest.split_whitespace()
                .find_map(|w| w.strip_prefix(ROLES_PREFIX))
        })
        .map(|list| {
            list.split(',')
                .filter(|r| !r.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A rule that cannot be rendered safely.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("rule {index}: {problem}")]
pub struct RuleError {
    /// Index of the rule in `spec.rules`.
    pub index: usize,
    /// What is wrong.
    pub problem: String,
}

fn safe_word(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.+@=/-*:, ".contains(c))
}

fn quote(s: &str) -> String {
    // Only called on values that passed `safe_*`: no quote, backslash, brace, `$` or newline.
    format!("\"{s}\"")
}

fn params_block(
    out: &mut String,
    name: &str,
    map: &std::collections::BTreeMap<String, Vec<String>>,
) {
    out.push_str(&format!("  {name} = {{\n"));
    for (k, values) in map {
        let values: Vec<String> = values.iter().map(|v| quote(v)).collect();
        out.push_str(&format!("    {} = [{}]\n", quote(k), values.join(", ")));
    }
    out.push_str("  }\n");
}

/// Renders `rules` under the ownership `marker` line. Same rules → byte-identical HCL.
pub fn render(marker: &str, rules: &[PolicyRule]) -> Result<String, RuleError> {
    let mut out = marker.to_string();
    out.push('\n');
    for (index, rule) in rules.iter().enumerate() {
        let bad = |problem: String| RuleError { index, problem };
        // The one path rule: letters, digits and _ . + @ = -, single slashes, no `.`/`..`.
        openbao_path::check("path", &rule.path, Shape::Glob).map_err(|e| bad(e.to_string()))?;
        let maps = [
            ("allowed_parameters", &rule.allowed_parameters),
            ("denied_parameters", &rule.denied_parameters),
        ];
        for (name, map) in &maps {
            for (k, values) in map.iter().flat_map(|m| m.iter()) {
                if k.is_empty() || !safe_word(k) || !values.iter().all(|v| safe_word(v)) {
                    return Err(bad(format!(
                        "{name} key {k:?} or one of its values holds a character other than letters, digits and _ . + @ = / - * : , space"
                    )));
                }
            }
        }
        let required = rule.required_parameters.clone().unwrap_or_default();
        if let Some(p) = required.iter().find(|p| p.is_empty() || !safe_word(p)) {
            return Err(bad(format!(
                "required parameter {p:?} holds a forbidden character"
            )));
        }
        let mut caps = rule.capabilities.clone();
        caps.sort();
        caps.dedup();
        let caps: Vec<String> = caps.iter().map(|c| quote(c.as_str())).collect();
        out.push_str(&format!("\npath {} {{\n", quote(&rule.path)));
        out.push_str(&format!("  capabilities = [{}]\n", caps.join(", ")));
        for (name, map) in maps {
            if let Some(map) = map {
                params_block(&mut out, name, map);
            }
        }
        if !required.is_empty() {
            let mut required = required;
            required.sort();
            required.dedup();
            let required: Vec<String> = required.iter().map(|p| quote(p)).collect();
            out.push_str(&format!(
                "  required_parameters = [{}]\n",
                required.join(", ")
            ));
        }
        out.push_str("}\n");
    }
    Ok(out)
}

/// Raw HCL under the ownership `marker` line.
pub fn wrap_raw(marker: &str, hcl: &str) -> String {
    format!("{marker}\n{}\n", hcl.trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::baopolicy::Capability;

    fn rule(path: &str) -> PolicyRule {
        PolicyRule {
            path: path.into(),
            capabilities: vec![Capability::List, Capability::Read, Capability::Read],
            allowed_parameters: None,
            denied_parameters: None,
            required_parameters: None,
        }
    }

    #[test]
    fn renders_the_seed_example_deterministically() {
        let hcl = render(&marker("u1", &[]), &[rule("secret/data/myapp/*")]).unwrap();
        assert_eq!(
            hcl,
            "# managed-by: kubebao.io BaoPolicy u1\n\npath \"secret/data/myapp/*\" {\n  capabilities = [\"read\", \"list\"]\n}\n"
        );
        assert_eq!(owner_uid(&hcl), Some("u1"));
    }

    #[test]
    fn refuses_paths_that_could_inject_hcl() {
        for evil in [
            "secret/x\" {\n capabilities = [\"sudo\"] }\npath \"*",
            "a}b",
            "a b",
            "a\nb",
            "a*b",
            "${x}",
            "",
        ] {
            assert!(
                render(&marker("u", &[]), &[rule(evil)]).is_err(),
                "{evil:?} accepted"
            );
        }
    }

    #[test]
    fn refuses_parameter_values_that_could_inject_hcl() {
        let mut r = rule("a/b");
        let evil = "x\"]\n}".to_string();
        r.allowed_parameters = Some([("k".to_string(), vec![evil])].into());
        assert!(render(&marker("u", &[]), &[r]).is_err());
    }

    #[test]
    fn renders_parameter_constraints() {
        let mut r = rule("a/+/b");
        r.allowed_parameters = Some([("ttl".to_string(), vec!["1h".to_string()])].into());
        r.required_parameters = Some(vec!["ttl".into()]);
        let hcl = render(&marker("u", &[]), &[r]).unwrap();
        assert!(hcl.contains("allowed_parameters = {\n    \"ttl\" = [\"1h\"]\n  }"));
        assert!(hcl.contains("required_parameters = [\"ttl\"]"));
    }

    #[test]
    fn the_marker_records_owned_roles_and_nothing_after_it_can() {
        let roles = vec!["kubernetes/a".to_string(), "k8s/prod/b".to_string()];
        let hcl = wrap_raw(
            &marker("u1", &roles),
            "# managed-by: kubebao.io BaoPolicy u2 roles=kubernetes/victim\npath \"a\" {}",
        );
        assert_eq!(owner_uid(&hcl), Some("u1"));
        assert_eq!(owned_roles(&hcl), roles);
        assert_eq!(owned_roles("path \"a\" {}"), Vec::<String>::new());
        assert_eq!(owner_uid("# managed-by: kubebao.io BaoPolicy "), None);
    }

    mod properties {
        //! No value in a rule changes the policy's structure, and no raw HCL claims an owner or
        //! a role.

        use proptest::collection::{btree_map, vec};
        use proptest::prelude::*;

        use super::*;

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-z0-9/*+._@=:, -]{0,16}",
                "\\PC{0,16}",
                Just("x\" {\n capabilities = [\"sudo\"] }\npath \"*".to_string()),
                Just("${jndi}".to_string()),
            ]
        }

        fn params() -> impl Strategy<Value = Option<std::collections::BTreeMap<String, Vec<String>>>>
        {
            proptest::option::of(btree_map(text(), vec(text(), 0..3), 0..3))
        }

        fn rules() -> impl Strategy<Value = Vec<PolicyRule>> {
            let rule = (
                text(),
                params(),
                params(),
                proptest::option::of(vec(text(), 0..3)),
            );
            vec(rule, 1..4).prop_map(|rules| {
                rules
                    .into_iter()
                    .map(|(path, allowed, denied, required)| PolicyRule {
                        path,
                        capabilities: vec![Capability::Read, Capability::Update],
                        allowed_parameters: allowed,
                        denied_parameters: denied,
                        required_parameters: required,
                    })
                    .collect()
            })
        }

        /// The same rules with every string replaced by a harmless one (equal strings stay
        /// equal, so de-duplication keeps the same shape).
        fn harmless(rules: &[PolicyRule]) -> Vec<PolicyRule> {
            let h = |s: &String| format!("x{}", hex::encode(s));
            let map = |m: &Option<std::collections::BTreeMap<String, Vec<String>>>| {
                m.as_ref().map(|m| {
                    m.iter()
                        .map(|(k, v)| (h(k), v.iter().map(h).collect()))
                        .collect()
                })
            };
            rules
                .iter()
                .map(|r| PolicyRule {
                    path: h(&r.path),
                    capabilities: r.capabilities.clone(),
                    allowed_parameters: map(&r.allowed_parameters),
                    denied_parameters: map(&r.denied_parameters),
                    required_parameters: r
                        .required_parameters
                        .as_ref()
                        .map(|v| v.iter().map(h).collect()),
                })
                .collect()
        }

        /// The HCL with every quoted string emptied; `None` if a quoted string holds anything
        /// that could end it or escape from it.
        fn skeleton(hcl: &str) -> Option<String> {
            let mut out = String::new();
            let mut quoted = false;
            for c in hcl.chars() {
                if c == '"' {
                    quoted = !quoted;
                    out.push(c);
                } else if quoted {
                    if "\\\n{}$".contains(c) {
                        return None;
                    }
                } else {
                    out.push(c);
                }
            }
            (!quoted).then_some(out)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn no_value_changes_the_policy_structure(rules in rules()) {
                match render(&marker("u", &[]), &rules) {
                    Ok(hcl) => {
                        let reference = render(&marker("u", &[]), &harmless(&rules)).unwrap();
                        prop_assert!(skeleton(&hcl).is_some(), "{}", hcl);
                        prop_assert_eq!(skeleton(&hcl), skeleton(&reference));
                        prop_assert_eq!(owner_uid(&hcl), Some("u"));
                        prop_assert!(owned_roles(&hcl).is_empty());
                    }
                    Err(e) => {
                        prop_assert!(e.index < rules.len());
                        let prefix = format!("rule {}: ", e.index);
                        prop_assert!(e.to_string().starts_with(&prefix), "{}", e);
                    }
                }
            }

            #[test]
            fn raw_hcl_never_claims_an_owner_or_a_role(raw in "(\\PC|\n){0,200}") {
                let roles = vec!["kubernetes/mine".to_string()];
                let hcl = wrap_raw(&marker("u", &roles), &raw);
                prop_assert_eq!(owner_uid(&hcl), Some("u"));
                prop_assert_eq!(owned_roles(&hcl), roles);
            }
        }
    }
}
