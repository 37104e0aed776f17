//! The templates of a BaoSecret (`spec.template.data`): MiniJinja (Jinja2 syntax), sandboxed.
//!
//! - A template sees only the context it is given: each source's data by its name. MiniJinja
//!   is built without its loader, `include`/`import`/`extends`, macros and debug output (those
//!   features are not compiled in), so no template reaches a file, the network or another
//!   template.
//! - Undefined names are errors (strict): a misspelt key never renders as an empty password.
//! - Bounded: each key renders with [`FUEL`] (MiniJinja charges every instruction and every byte
//!   it creates, so fuel bounds both time and memory), and all outputs together stop at a byte
//!   budget (the Secret's 1 MiB).
//! - Errors name the Secret key and the template line and never hold a value: MiniJinja's
//!   detail is kept only for the kinds of error whose detail comes from the template's text.

use std::collections::BTreeMap;
use std::io;

use minijinja::value::Serde;
use minijinja::{AutoEscape, Environment, ErrorKind, Template, UndefinedBehavior};
use serde_json::{Map, Value};

/// Fuel for one key's render: about 100,000 instructions, or 6 MB of data created.
pub const FUEL: u64 = 100_000;

/// Each source's data by source name: what a template sees.
pub type Context = BTreeMap<String, Map<String, Value>>;

/// Why the templates could not be rendered. Never holds a value read from OpenBao.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateError {
    /// A template is invalid or failed; the message names the key and the line.
    Failed(String),
    /// The outputs passed the byte budget; the message names the key.
    TooLarge(String),
}

/// The one environment every template is parsed and rendered in.
fn environment<'a>() -> Environment<'a> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    // Secret keys such as `index.html` must not switch on HTML escaping.
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_fuel(Some(FUEL));
    // A dump of the whole state: no use in a Secret.
    env.remove_global("debug");
    env
}

/// Checks that every template parses (before anything is read from OpenBao).
pub fn check(templates: &BTreeMap<String, String>) -> Result<(), TemplateError> {
    let env = environment();
    for (key, text) in templates {
        env.template_from_named_str(key, text)
            .map_err(|e| failed(key, &e, None))?;
    }
    Ok(())
}

/// Renders every template with `context`; the outputs together hold at most `budget` bytes.
pub fn render(
    templates: &BTreeMap<String, String>,
    context: &Context,
    budget: usize,
) -> Result<BTreeMap<String, Vec<u8>>, TemplateError> {
    let env = environment();
    let root = minijinja::Value::from(Serde(context));
    let mut rendered = BTreeMap::new();
    let mut left = budget;
    for (key, text) in templates {
        let template = env
            .template_from_named_str(key, text)
            .map_err(|e| failed(key, &e, None))?;
        let mut out = Bounded {
            bytes: Vec::new(),
            limit: left,
            full: false,
        };
        if let Err(e) = template.render_captured_to(root.clone(), &mut out) {
            if out.full {
                return Err(TemplateError::TooLarge(format!(
                    "spec.template.data[{key:?}] renders more than the {budget} bytes a Secret holds (with the other keys); make it smaller"
                )));
            }
            return Err(failed(key, &e, Some((&template, context))));
        }
        left -= out.bytes.len();
        rendered.insert(key.clone(), out.bytes);
    }
    Ok(rendered)
}

/// The condition message for error `e` of the template of `key`: the key, the line and what
/// went wrong, never a value. With the template and context, an undefined-value error names
/// the undefined names (names and keys are not secret; values are).
fn failed(
    key: &str,
    e: &minijinja::Error,
    rendering: Option<(&Template<'_, '_>, &Context)>,
) -> TemplateError {
    let line = e.line().map(|n| format!(" line {n}")).unwrap_or_default();
    let kind = e.kind();
    let what = match (kind, e.detail()) {
        (ErrorKind::OutOfFuel, _) => format!(
            "the template needs more work than one may do ({FUEL} fuel: instructions and bytes created); simplify it"
        ),
        (ErrorKind::UndefinedError, _) => {
            let names = rendering.map(|(t, c)| undefined(t, c)).unwrap_or_default();
            if names.is_empty() {
                "undefined value".to_string()
            } else {
                format!("undefined value: {}", names.join("; "))
            }
        }
        (_, Some(detail)) if detail_from_text(kind) => format!("{kind}: {detail}"),
        // The detail of other errors may quote a value (e.g. "unable to calculate 5 + x").
        _ => format!("{kind}"),
    };
    TemplateError::Failed(format!("spec.template.data[{key:?}]{line}: {what}"))
}

/// Errors whose detail MiniJinja builds from the template's text (tokens, names), never from
/// the values the template works on.
fn detail_from_text(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::SyntaxError
            | ErrorKind::UnknownFilter
            | ErrorKind::UnknownTest
            | ErrorKind::UnknownFunction
            | ErrorKind::UnknownMethod
            | ErrorKind::TooManyArguments
            | ErrorKind::MissingArgument
            | ErrorKind::BadEscape
            | ErrorKind::TemplateNotFound
    )
}

/// The names `template` uses that `context` does not define (`db.pasword`), each with what
/// is there instead (source names, or the keys of that source).
fn undefined(template: &Template<'_, '_>, context: &Context) -> Vec<String> {
    let env_globals: Vec<String> = environment()
        .globals()
        .map(|(g, _)| g.to_string())
        .collect();
    let sources: Vec<&String> = context.keys().collect();
    let mut names: Vec<String> = template
        .undeclared_variables(true)
        .into_iter()
        .filter_map(|name| {
            let mut parts = name.split('.');
            let source = parts.next().unwrap_or_default();
            match context.get(source) {
                None if env_globals.iter().any(|g| g == source) => None,
                None => Some(format!("{source} is not defined (sources: {sources:?})")),
                Some(data) => parts.next().filter(|k| !data.contains_key(*k)).map(|k| {
                    let mut keys: Vec<&String> = data.keys().collect();
                    keys.sort();
                    format!("{source}.{k} is not defined ({source} has keys {keys:?})")
                }),
            }
        })
        .collect();
    names.sort();
    names
}

/// Output that refuses to grow past `limit` bytes.
struct Bounded {
    bytes: Vec<u8>,
    limit: usize,
    full: bool,
}

impl io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit {
            self.full = true;
            return Err(io::Error::other("the output is over its byte budget"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
