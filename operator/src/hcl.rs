//! Rendering BaoPolicy rules to HCL, deterministically and without any way for a value to
//! change the policy's structure, and the ownership marker KubeBao keeps in every policy.

use crate::api::PolicyRule;

/// The first line of every policy KubeBao writes: `# managed-by: kubebao.io BaoPolicy <uid>`.
pub fn marker(uid: &str) -> String {
    format!("# managed-by: kubebao.io BaoPolicy {uid}")
}

/// The BaoPolicy uid in a policy's marker line, if KubeBao wrote it.
pub fn owner_uid(hcl: &str) -> Option<&str> {
    hcl.lines()
        .next()?
        .strip_prefix("# managed-by: kubebao.io BaoPolicy ")
        .map(str::trim)
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

fn safe_path(path: &str) -> bool {
    let body = path.strip_suffix('*').unwrap_or(path);
    !body.is_empty()
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.+@=/-".contains(c))
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

/// Renders `rules` under the ownership marker. Same rules → byte-identical HCL.
pub fn render(uid: &str, rules: &[PolicyRule]) -> Result<String, RuleError> {
    let mut out = marker(uid);
    out.push('\n');
    for (index, rule) in rules.iter().enumerate() {
        let bad = |problem: String| RuleError { index, problem };
        if !safe_path(&rule.path) {
            return Err(bad(format!(
                "path {:?} may only hold letters, digits and _ . + @ = / - (and end in *)",
                rule.path
            )));
        }
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

/// Raw HCL under the ownership marker.
pub fn wrap_raw(uid: &str, hcl: &str) -> String {
    format!("{}\n{}\n", marker(uid), hcl.trim_end())
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
        let hcl = render("u1", &[rule("secret/data/myapp/*")]).unwrap();
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
            assert!(render("u", &[rule(evil)]).is_err(), "{evil:?} accepted");
        }
    }

    #[test]
    fn refuses_parameter_values_that_could_inject_hcl() {
        let mut r = rule("a/b");
        let evil = "x\"]\n}".to_string();
        r.allowed_parameters = Some([("k".to_string(), vec![evil])].into());
        assert!(render("u", &[r]).is_err());
    }

    #[test]
    fn renders_parameter_constraints() {
        let mut r = rule("a/+/b");
        r.allowed_parameters = Some([("ttl".to_string(), vec!["1h".to_string()])].into());
        r.required_parameters = Some(vec!["ttl".into()]);
        let hcl = render("u", &[r]).unwrap();
        assert!(hcl.contains("allowed_parameters = {\n    \"ttl\" = [\"1h\"]\n  }"));
        assert!(hcl.contains("required_parameters = [\"ttl\"]"));
    }
}
