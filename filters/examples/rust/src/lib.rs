//! wasmgate example filter in Rust, on our SDK (filters/sdk). The same job as the AssemblyScript
//! and C examples (filters/README.md, "Languages"):
//!   config (plain text, one directive per line):
//!     add-header NAME VALUE     set request header NAME to VALUE before it goes upstream
//!     require-header NAME       answer 403 to a request without header NAME
//! Header names are matched as the host stores them: lowercase.
use std::rc::Rc;

use wasmgate_sdk::error;
use wasmgate_sdk::traits::*;
use wasmgate_sdk::types::*;

#[derive(Default, Debug, PartialEq)]
pub struct Rules {
    add: Vec<(String, String)>,
    require: Vec<String>,
}

impl Rules {
    /// The rules of a configuration, or the first line at fault and why.
    pub fn parse(text: &str) -> Result<Rules, String> {
        let mut rules = Rules::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (directive, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim();
            let why = match directive {
                "add-header" => match rest.split_once(char::is_whitespace) {
                    Some((name, value)) => {
                        rules.add.push((name.to_string(), value.trim().to_string()));
                        continue;
                    }
                    None => "add-header needs NAME VALUE",
                },
                "require-header" if !rest.is_empty() && !rest.contains(char::is_whitespace) => {
                    rules.require.push(rest.to_string());
                    continue;
                }
                "require-header" => "require-header needs one NAME",
                _ => "unknown directive (add-header, require-header)",
            };
            return Err(format!("line {}: {}", i + 1, why));
        }
        Ok(rules)
    }
}

wasmgate_sdk::main! {{
    wasmgate_sdk::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { rules: Rc::default() }) });
}}

struct Root {
    rules: Rc<Rules>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match Rules::parse(&String::from_utf8_lossy(&bytes)) {
            Ok(rules) => {
                self.rules = Rc::new(rules);
                true
            }
            Err(e) => {
                error!("example (rust): bad configuration, {}", e);
                false // the gateway refuses to load the filter
            }
        }
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Stream { rules: self.rules.clone() }))
    }
}

struct Stream {
    rules: Rc<Rules>,
}

impl Context for Stream {}

impl HttpContext for Stream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        for name in &self.rules.require {
            if self.get_http_request_header(name).is_none() {
                let body = format!("missing header {}\n", name);
                self.send_http_response(403, vec![("content-type", "text/plain")], Some(body.as_bytes()));
                return Action::Pause;
            }
        }
        for (name, value) in &self.rules.add {
            self.set_http_request_header(name, Some(value));
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_directives_and_names_the_bad_line() {
        let r = Rules::parse("# comment\nadd-header x-a hello world\n\nrequire-header x-key\n").unwrap();
        assert_eq!(r.add, vec![("x-a".to_string(), "hello world".to_string())]);
        assert_eq!(r.require, vec!["x-key".to_string()]);
        assert_eq!(Rules::parse("add-header x-a").unwrap_err(), "line 1: add-header needs NAME VALUE");
        assert_eq!(Rules::parse("\nrequire-header a b").unwrap_err(), "line 2: require-header needs one NAME");
        assert_eq!(Rules::parse("drop x").unwrap_err(), "line 1: unknown directive (add-header, require-header)");
        assert_eq!(Rules::parse("").unwrap(), Rules::default());
    }
}
