//! The template engine: what it renders, what it refuses, and that nothing it is given makes
//! it panic, pass its bounds or put a value into an error.

use serde_json::json;

use super::*;

const MIB: usize = 1024 * 1024;
/// A value no message may ever contain.
const PASSWORD: &str = "pa55:w/rd@SECRET";

fn context() -> Context {
    let db = json!({"user": "app", "password": PASSWORD, "host": "db.local", "port": 5432});
    let cache = json!({"url": "redis://cache", "password": "c4che-SECRET"});
    [
        ("db".to_string(), db.as_object().unwrap().clone()),
        ("cache".to_string(), cache.as_object().unwrap().clone()),
    ]
    .into()
}

fn templates(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn render_one(text: &str) -> Result<String, TemplateError> {
    let out = render(&templates(&[("out", text)]), &context(), MIB)?;
    Ok(String::from_utf8(out["out"].clone()).unwrap())
}

fn message(e: TemplateError) -> String {
    match e {
        TemplateError::Failed(m) | TemplateError::TooLarge(m) => m,
    }
}

#[test]
fn renders_each_key_from_the_sources_data() {
    let out = render(
        &templates(&[
            (
                "dsn",
                "postgres://{{ db.user }}:{{ db.password | urlencode }}@{{ db.host }}:{{ db.port }}/app",
            ),
            ("redis", "{{ cache.url }}"),
            ("config.json", "{{ {'password': db.password} | tojson }}"),
        ]),
        &context(),
        MIB,
    )
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out["dsn"]),
        // Jinja's urlencode keeps `/`.
        "postgres://app:pa55%3Aw/rd%40SECRET@db.local:5432/app"
    );
    assert_eq!(out["redis"], b"redis://cache");
    assert_eq!(
        String::from_utf8_lossy(&out["config.json"]),
        format!("{{\"password\": \"{PASSWORD}\"}}")
    );
    assert_eq!(out.len(), 3);
}

#[test]
fn no_html_escaping_whatever_the_key_is_called() {
    let out = render(
        &templates(&[("index.html", "<a href=\"{{ cache.url }}\">{{ '<&>' }}</a>")]),
        &context(),
        MIB,
    )
    .unwrap();
    assert_eq!(out["index.html"], b"<a href=\"redis://cache\"><&></a>");
}

#[test]
fn an_undefined_name_is_an_error_naming_key_line_and_name_not_a_value() {
    let e = render_one("user={{ db.user }}\npass={{ db.pasword }}\n").unwrap_err();
    let m = message(e);
    assert!(
        m.starts_with("spec.template.data[\"out\"] line 2: undefined value"),
        "{m}"
    );
    assert!(m.contains("db.pasword is not defined"), "{m}");
    assert!(m.contains("\"password\""), "the keys that exist: {m}");
    assert!(!m.contains(PASSWORD) && !m.contains("SECRET"), "{m}");
    let m = message(render_one("{{ dbx.password }}").unwrap_err());
    assert!(
        m.contains("dbx is not defined") && m.contains("\"cache\""),
        "{m}"
    );
    // Asking whether a name is defined, or giving a default, is not an error.
    assert_eq!(
        render_one("{{ db.nope | default('none') }}{% if db.nope is defined %}!{% endif %}")
            .unwrap(),
        "none"
    );
}

#[test]
fn syntax_errors_name_the_line_and_are_found_before_any_read() {
    let bad = templates(&[("ok", "{{ db.user }}"), ("dsn", "a\nb\n{{ db.user ")]);
    let m = message(check(&bad).unwrap_err());
    assert!(
        m.starts_with("spec.template.data[\"dsn\"] line 3: syntax error"),
        "{m}"
    );
    assert!(check(&templates(&[("ok", "{{ db.user }}")])).is_ok());
}

#[test]
fn templates_reach_no_other_template_file_or_macro() {
    for text in [
        "{% include 'x' %}",
        "{% import 'x' as y %}",
        "{% from 'x' import y %}",
        "{% extends 'x' %}",
        "{% macro m() %}x{% endmacro %}",
        "{{ debug() }}",
    ] {
        let e = render_one(text).unwrap_err();
        assert!(matches!(e, TemplateError::Failed(_)), "{text}: {e:?}");
    }
}

#[test]
fn errors_that_could_quote_a_value_say_only_their_kind() {
    for text in [
        "{{ db.password + 1 }}",
        "{{ db.password - 1 }}",
        "{{ db.password | int + [] }}",
        "{{ db.password() }}",
        "{{ db.password | attr(db.password) }}",
        "{{ db.port / 0 }}",
        "{{ -db.password }}",
        "{% for a, b in db.password %}{% endfor %}",
    ] {
        let m = message(render_one(text).unwrap_err());
        assert!(
            m.starts_with("spec.template.data[\"out\"] line 1: "),
            "{text}: {m}"
        );
        assert!(!m.contains("SECRET") && !m.contains("5432"), "{text}: {m}");
    }
}

#[test]
fn work_and_output_are_bounded() {
    let m = message(
        render_one(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        )
        .unwrap_err(),
    );
    assert!(m.contains("more work than one may do"), "{m}");
    // Doubling a string: memory is charged as fuel, so this stops long before it hurts.
    let doubling = (0..40).map(|_| "{% set s = s ~ s %}").collect::<String>();
    let m = message(
        render_one(&format!("{{% set s = db.password %}}{doubling}{{{{ s }}}}")).unwrap_err(),
    );
    assert!(m.contains("more work than one may do"), "{m}");
    // Within the fuel but over the byte budget: refused, naming the key.
    let big = render(
        &templates(&[("big", "{{ 'x' * 2000000 }}")]),
        &context(),
        MIB,
    );
    assert!(
        matches!(&big, Err(TemplateError::TooLarge(m)) if m.contains("\"big\"")),
        "{big:?}"
    );
    // The budget is shared by all keys.
    let two = templates(&[("a", "{{ 'x' * 600 }}"), ("b", "{{ 'y' * 600 }}")]);
    assert!(matches!(
        render(&two, &context(), 1000),
        Err(TemplateError::TooLarge(_))
    ));
    assert_eq!(render(&two, &context(), 1200).unwrap()["b"].len(), 600);
}

#[test]
fn the_example_renders_as_its_comments_say() {
    let yaml = include_str!("../../../../examples/baosecret-template.yaml");
    let bs: crate::api::BaoSecret = serde_saphyr::from_str(yaml).unwrap();
    let t = bs.spec.template.expect("a template");
    check(&t.data).unwrap();
    let out = render(&t.data, &context(), MIB).unwrap();
    let text = |k: &str| String::from_utf8(out[k].clone()).unwrap();
    assert_eq!(
        text("DATABASE_URL"),
        "postgres://app:pa55%3Aw/rd%40SECRET@db.local:5432/app"
    );
    assert_eq!(text("REDIS_URL"), "redis://cache");
    let config: serde_json::Value = serde_json::from_str(&text("config.json")).unwrap();
    assert_eq!(config["database"]["password"], PASSWORD);
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Template pieces: valid and broken syntax, every kind of expression on the values.
    fn piece() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("{{ db.password }}".to_string()),
            Just("{{ db.password ~ db.password }}".to_string()),
            Just("{{ db.port * 3 }}".to_string()),
            Just("{{ db.password * 99999 }}".to_string()),
            Just("{{ db.password + db.port }}".to_string()),
            Just("{{ db.password | int }}".to_string()),
            Just("{{ db.password | upper | replace('S', 'SS') }}".to_string()),
            Just("{{ db.password[1:3] }}".to_string()),
            Just("{{ db.nope }}".to_string()),
            Just("{{ cache | tojson }}".to_string()),
            Just("{% for k in db %}{{ k }}={{ db[k] }};{% endfor %}".to_string()),
            Just("{% for i in range(db.port) %}{{ db.password }}{% endfor %}".to_string()),
            Just("{% set s = db.password %}{% set s = s ~ s ~ s %}{{ s }}".to_string()),
            Just("{% if db.password == 'x' %}a{% else %}b{% endif %}".to_string()),
            Just("{{ '%s-%d' | format(db.password, db.port) }}".to_string()),
            Just("{{".to_string()),
            Just("{% endfor %}".to_string()),
            Just("\n".to_string()),
            "[a-z {}%|.~()'\"\\[\\]0-9+*-]{0,12}",
            "\\PC{0,8}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn nothing_panics_passes_the_bounds_or_shows_a_value(
            pieces in proptest::collection::vec(piece(), 0..8),
            password in "[a-zA-Z0-9:/@%]{0,20}",
            budget in 0usize..4096,
        ) {
            let text: String = pieces.concat();
            let mut context = context();
            let secret = format!("SECRET{password}");
            context.get_mut("db").unwrap().insert("password".into(), json!(secret));
            let set = templates(&[("a", &text), ("b", &text)]);
            let _ = check(&set);
            match render(&set, &context, budget) {
                Ok(out) => {
                    let total: usize = out.values().map(Vec::len).sum();
                    prop_assert!(total <= budget, "{} > {}", total, budget);
                }
                Err(e) => {
                    let m = message(e);
                    prop_assert!(m.starts_with("spec.template.data["), "{}", m);
                    prop_assert!(!m.contains("SECRET"), "{}", m);
                }
            }
        }
    }
}
