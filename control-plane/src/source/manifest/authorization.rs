//! `AuthorizationPolicy` (`policy.weft.io/v1alpha1`) manifests → [`AuthorizationPolicy`].
//! The spec is read field by field from the YAML value rather than through serde, so that
//! every error names its exact field (`spec.rules[0].to[1].paths[0]`). Two things a CRD
//! schema would let through are refused here because they silently widen a policy: an
//! unknown field (a misspelt `form:` would make a rule match every client) and an explicit
//! empty list (`from: []` reads as "nobody" but the contract says "everybody").

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

use super::{meta_from, port_number, Object, ObjectMeta};
use crate::model::authz::{
    AuthorizationPolicy, DestinationMatch, IpNet, NetworkMatch, PathPattern, PolicyAction,
    PolicyRule, SourceMatch,
};
use crate::model::{InvalidField, TargetPort};

#[derive(Debug, Deserialize)]
pub(super) struct AuthorizationPolicyManifest {
    metadata: Option<ObjectMeta>,
    spec: Option<Value>,
}

pub(super) fn authorization_policy_from(
    manifest: AuthorizationPolicyManifest,
) -> Result<Object, InvalidField> {
    let meta = meta_from(manifest.metadata)?;
    let spec = manifest
        .spec
        .filter(|spec| !spec.is_null())
        .ok_or_else(|| InvalidField::new("spec", "is required"))?;
    let spec = Fields::of(&spec, "spec", &["selector", "ports", "action", "rules"])?;

    let selector = match spec.get("selector") {
        None => BTreeMap::new(),
        Some(value) => selector_from(value, &spec.path("selector"))?,
    };
    let ports = match spec.get("ports") {
        None => Vec::new(),
        Some(value) => {
            let field = spec.path("ports");
            non_empty_list(value, &field)?
                .iter()
                .enumerate()
                .map(|(i, port)| port_from(port, &format!("{field}[{i}]")))
                .collect::<Result<_, _>>()?
        }
    };
    let action = match spec.get("action") {
        None => PolicyAction::default(),
        Some(value) => {
            let field = spec.path("action");
            let text = string(value, &field)?;
            PolicyAction::parse(text).ok_or_else(|| {
                InvalidField::new(field, format!("{text:?} is not ALLOW, DENY or AUDIT"))
            })?
        }
    };
    let rules = match spec.get("rules") {
        None => Vec::new(),
        Some(value) => {
            let field = spec.path("rules");
            list(value, &field)?
                .iter()
                .enumerate()
                .map(|(i, rule)| rule_from(rule, &format!("{field}[{i}]")))
                .collect::<Result<_, _>>()?
        }
    };
    let policy = AuthorizationPolicy {
        namespace: meta.namespace,
        name: meta.name,
        selector,
        ports,
        action,
        rules,
    };
    policy.validate()?;
    Ok(Object::AuthorizationPolicy(policy))
}

/// A YAML mapping with a known set of keys; `null` values count as absent.
struct Fields<'a> {
    map: &'a Mapping,
    field: &'a str,
}

impl<'a> Fields<'a> {
    fn of(value: &'a Value, field: &'a str, allowed: &[&str]) -> Result<Self, InvalidField> {
        let Value::Mapping(map) = value else {
            return Err(InvalidField::new(field, "must be a mapping"));
        };
        for key in map.keys() {
            match key.as_str() {
                Some(key) if allowed.contains(&key) => {}
                Some(key) => {
                    return Err(InvalidField::new(
                        format!("{field}.{key}"),
                        format!("unknown field (expected one of {})", allowed.join(", ")),
                    ))
                }
                None => return Err(InvalidField::new(field, "keys must be strings")),
            }
        }
        Ok(Self { map, field })
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|value| !value.is_null())
    }

    fn path(&self, key: &str) -> String {
        format!("{}.{key}", self.field)
    }
}

fn string<'a>(value: &'a Value, field: &str) -> Result<&'a str, InvalidField> {
    value
        .as_str()
        .ok_or_else(|| InvalidField::new(field, "must be a string"))
}

fn list<'a>(value: &'a Value, field: &str) -> Result<&'a [Value], InvalidField> {
    value
        .as_sequence()
        .map(Vec::as_slice)
        .ok_or_else(|| InvalidField::new(field, "must be a list"))
}

fn non_empty_list<'a>(value: &'a Value, field: &str) -> Result<&'a [Value], InvalidField> {
    let items = list(value, field)?;
    if items.is_empty() {
        return Err(InvalidField::new(
            field,
            "an empty list is ambiguous here; leave the field out instead",
        ));
    }
    Ok(items)
}

/// A non-empty list of strings, each passed through `convert` with its own field path.
fn strings<T>(
    value: &Value,
    field: &str,
    convert: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, InvalidField> {
    non_empty_list(value, field)?
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let item_field = format!("{field}[{i}]");
            let text = string(item, &item_field)?;
            convert(text).map_err(|reason| InvalidField::new(item_field, reason))
        })
        .collect()
}

fn selector_from(value: &Value, field: &str) -> Result<BTreeMap<String, String>, InvalidField> {
    let selector = Fields::of(value, field, &["matchLabels", "matchExpressions"])?;
    // Ignoring expressions would select more pods than the author meant.
    if let Some(expressions) = selector.get("matchExpressions") {
        if !list(expressions, &selector.path("matchExpressions"))?.is_empty() {
            return Err(InvalidField::new(
                selector.path("matchExpressions"),
                "is not supported; use matchLabels",
            ));
        }
    }
    let mut labels = BTreeMap::new();
    if let Some(match_labels) = selector.get("matchLabels") {
        let field = selector.path("matchLabels");
        let Value::Mapping(map) = match_labels else {
            return Err(InvalidField::new(field, "must be a mapping"));
        };
        for (key, value) in map {
            let key = key
                .as_str()
                .ok_or_else(|| InvalidField::new(&field, "keys must be strings"))?;
            let value = string(value, &format!("{field}[{key}]"))?;
            labels.insert(key.to_owned(), value.to_owned());
        }
    }
    Ok(labels)
}

fn port_from(value: &Value, field: &str) -> Result<TargetPort, InvalidField> {
    match value {
        Value::Number(number) => {
            let number = number
                .as_i64()
                .ok_or_else(|| InvalidField::new(field, format!("{number} is not a port")))?;
            Ok(TargetPort::Number(port_number(field, number)?))
        }
        // A quoted number is a number, as for Service target ports.
        Value::String(text) if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) => {
            let number = text.parse::<i64>().unwrap_or(i64::MAX);
            Ok(TargetPort::Number(port_number(field, number)?))
        }
        Value::String(name) => Ok(TargetPort::Name(name.clone())),
        _ => Err(InvalidField::new(
            field,
            "must be a port number or a container port name",
        )),
    }
}

fn rule_from(value: &Value, field: &str) -> Result<PolicyRule, InvalidField> {
    let rule = Fields::of(value, field, &["from", "to"])?;
    let from = match rule.get("from") {
        None => Vec::new(),
        Some(value) => {
            let field = rule.path("from");
            non_empty_list(value, &field)?
                .iter()
                .enumerate()
                .map(|(i, source)| source_from(source, &format!("{field}[{i}]")))
                .collect::<Result<_, _>>()?
        }
    };
    let to = match rule.get("to") {
        None => Vec::new(),
        Some(value) => {
            let field = rule.path("to");
            non_empty_list(value, &field)?
                .iter()
                .enumerate()
                .map(|(i, destination)| destination_from(destination, &format!("{field}[{i}]")))
                .collect::<Result<_, _>>()?
        }
    };
    Ok(PolicyRule { from, to })
}

fn source_from(value: &Value, field: &str) -> Result<SourceMatch, InvalidField> {
    let source = Fields::of(
        value,
        field,
        &[
            "identities",
            "serviceAccounts",
            "namespaces",
            "networks",
            "unauthenticated",
        ],
    )?;
    let plain = |key: &str| -> Result<Vec<String>, InvalidField> {
        match source.get(key) {
            None => Ok(Vec::new()),
            Some(value) => strings(value, &source.path(key), |text| Ok(text.to_owned())),
        }
    };
    let networks = match source.get("networks") {
        None => Vec::new(),
        Some(value) => {
            let field = source.path("networks");
            non_empty_list(value, &field)?
                .iter()
                .enumerate()
                .map(|(i, network)| network_from(network, &format!("{field}[{i}]")))
                .collect::<Result<_, _>>()?
        }
    };
    let unauthenticated = match source.get("unauthenticated") {
        None => false,
        Some(value) => value.as_bool().ok_or_else(|| {
            InvalidField::new(source.path("unauthenticated"), "must be true or false")
        })?,
    };
    Ok(SourceMatch {
        identities: plain("identities")?,
        service_accounts: plain("serviceAccounts")?,
        namespaces: plain("namespaces")?,
        networks,
        unauthenticated,
    })
}

/// `{cidr, except}`, or the CIDR alone as a string.
fn network_from(value: &Value, field: &str) -> Result<NetworkMatch, InvalidField> {
    if let Some(cidr) = value.as_str() {
        return Ok(NetworkMatch {
            cidr: IpNet::parse(cidr).map_err(|reason| InvalidField::new(field, reason))?,
            except: Vec::new(),
        });
    }
    let network = Fields::of(value, field, &["cidr", "except"])?;
    let cidr_field = network.path("cidr");
    let cidr = network
        .get("cidr")
        .ok_or_else(|| InvalidField::new(&cidr_field, "is required"))?;
    let cidr = IpNet::parse(string(cidr, &cidr_field)?)
        .map_err(|reason| InvalidField::new(&cidr_field, reason))?;
    let except = match network.get("except") {
        None => Vec::new(),
        Some(value) => strings(value, &network.path("except"), IpNet::parse)?,
    };
    Ok(NetworkMatch { cidr, except })
}

fn destination_from(value: &Value, field: &str) -> Result<DestinationMatch, InvalidField> {
    let destination = Fields::of(value, field, &["methods", "paths"])?;
    let methods = match destination.get("methods") {
        None => Vec::new(),
        Some(value) => strings(value, &destination.path("methods"), |method| {
            Ok(method.to_ascii_uppercase())
        })?,
    };
    let paths = match destination.get("paths") {
        None => Vec::new(),
        Some(value) => strings(value, &destination.path("paths"), PathPattern::parse)?,
    };
    Ok(DestinationMatch { methods, paths })
}

#[cfg(test)]
mod tests {
    use super::super::parse_documents;
    use super::*;

    fn policy_yaml(spec: &str) -> String {
        format!(
            "{{apiVersion: policy.weft.io/v1alpha1, kind: AuthorizationPolicy, metadata: {{name: internal-api, namespace: shop}}, spec: {spec}}}"
        )
    }

    fn parse_one(text: &str) -> Result<AuthorizationPolicy, String> {
        let parsed = parse_documents(text).map_err(|e| format!("yaml: {e}"))?;
        if let Some(problem) = parsed.problems.first() {
            return Err(problem.message.clone());
        }
        match parsed.objects.into_iter().next() {
            Some(Object::AuthorizationPolicy(policy)) => Ok(policy),
            other => Err(format!("not a policy: {other:?}")),
        }
    }

    #[test]
    fn the_design_example_parses() {
        let text = r#"
apiVersion: policy.weft.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: internal-api, namespace: shop}
spec:
  selector: {matchLabels: {app: internal}}
  ports: [8080, "9090", http]
  action: AUDIT
  rules:
  - from: [{serviceAccounts: ["shop/api"]}, {networks: ["10.0.0.0/8", {cidr: "fd00::/8", except: ["fd00:1::/32"]}], unauthenticated: true}]
    to:   [{methods: ["get"], paths: ["regex:/api/v1/users/.*"]},
           {methods: ["POST"], paths: ["/api/v1/orders", "/static/*"]}]
  - {}
"#;
        let policy = parse_one(text).unwrap();
        assert_eq!(policy.qualified_name(), "shop/internal-api");
        assert_eq!(
            policy.selector,
            BTreeMap::from([("app".to_owned(), "internal".to_owned())])
        );
        assert_eq!(
            policy.ports,
            vec![
                TargetPort::Number(8080),
                TargetPort::Number(9090),
                TargetPort::Name("http".into())
            ]
        );
        assert_eq!(policy.action, PolicyAction::Audit);
        assert_eq!(policy.rules.len(), 2);
        let rule = &policy.rules[0];
        assert_eq!(rule.from[0].service_accounts, vec!["shop/api".to_owned()]);
        assert!(!rule.from[0].unauthenticated);
        assert!(rule.from[1].unauthenticated);
        let networks: Vec<(String, Vec<String>)> = rule.from[1]
            .networks
            .iter()
            .map(|n| {
                (
                    n.cidr.to_string(),
                    n.except.iter().map(ToString::to_string).collect(),
                )
            })
            .collect();
        assert_eq!(
            networks,
            vec![
                ("10.0.0.0/8".to_owned(), vec![]),
                ("fd00::/8".to_owned(), vec!["fd00:1::/32".to_owned()])
            ]
        );
        assert_eq!(rule.to[0].methods, vec!["GET".to_owned()], "upper-cased");
        assert_eq!(
            rule.to[0].paths,
            vec![PathPattern::Regex("/api/v1/users/.*".into())]
        );
        assert_eq!(
            rule.to[1].paths,
            vec![
                PathPattern::Exact("/api/v1/orders".into()),
                PathPattern::Prefix("/static/".into())
            ]
        );
        assert_eq!(policy.rules[1], PolicyRule::default());
    }

    #[test]
    fn defaults_select_every_pod_and_port_and_allow() {
        let policy = parse_one(&policy_yaml("{}")).unwrap();
        assert!(policy.selector.is_empty());
        assert!(policy.ports.is_empty());
        assert_eq!(policy.action, PolicyAction::Allow);
        assert!(policy.rules.is_empty());
        let policy = parse_one(&policy_yaml(
            "{selector: {}, rules: [{from: [{namespaces: [shop]}]}]}",
        ))
        .unwrap();
        assert!(policy.selector.is_empty());
        assert_eq!(policy.rules[0].from[0].namespaces, vec!["shop".to_owned()]);
    }

    #[test]
    fn the_backtracking_regex_is_accepted() {
        let policy = parse_one(&policy_yaml(
            r#"{rules: [{to: [{paths: ["regex:(a+)+$"]}]}]}"#,
        ))
        .unwrap();
        assert_eq!(
            policy.rules[0].to[0].paths,
            vec![PathPattern::Regex("(a+)+$".into())]
        );
    }

    #[test]
    fn every_invalid_field_is_named() {
        let cases = [
            ("{selector: {matchLabels: {app: 'a b'}}}", "spec.selector.matchLabels[app]"),
            ("{selector: {matchLabels: {app: 7}}}", "spec.selector.matchLabels[app]"),
            ("{selector: {matchExpressions: [{key: app, operator: Exists}]}}", "spec.selector.matchExpressions"),
            ("{selector: {matchLabel: {app: x}}}", "spec.selector.matchLabel"),
            ("{ports: []}", "spec.ports"),
            ("{ports: [0]}", "spec.ports[0]"),
            ("{ports: [8080, 70000]}", "spec.ports[1]"),
            ("{ports: [8080, Not_A_Name]}", "spec.ports[1]"),
            ("{ports: [1.5]}", "spec.ports[0]"),
            ("{ports: 8080}", "spec.ports"),
            ("{action: allow}", "spec.action"),
            ("{action: LOG}", "spec.action"),
            ("{rules: {from: []}}", "spec.rules"),
            ("{rules: [{form: [{namespaces: [shop]}]}]}", "spec.rules[0].form"),
            ("{rules: [{from: []}]}", "spec.rules[0].from"),
            ("{rules: [{to: []}]}", "spec.rules[0].to"),
            ("{rules: [{from: [{}]}]}", "spec.rules[0].from[0]"),
            ("{rules: [{from: [{unauthenticated: false}]}]}", "spec.rules[0].from[0]"),
            ("{rules: [{from: [{unauthenticated: 'yes'}]}]}", "spec.rules[0].from[0].unauthenticated"),
            ("{rules: [{from: [{namespaces: [shop], unauthenticated: true}]}]}", "spec.rules[0].from[0].unauthenticated"),
            ("{rules: [{from: [{identities: []}]}]}", "spec.rules[0].from[0].identities"),
            ("{rules: [{from: [{identities: ['cluster.local/ns/shop/sa/api']}]}]}", "spec.rules[0].from[0].identities[0]"),
            ("{rules: [{from: [{identities: ['spiffe://cluster.local/ns/shop/sa/api', 'spiffe://Bad/x']}]}]}", "spec.rules[0].from[0].identities[1]"),
            ("{rules: [{from: [{identities: [7]}]}]}", "spec.rules[0].from[0].identities[0]"),
            ("{rules: [{from: [{serviceAccounts: [api]}]}]}", "spec.rules[0].from[0].serviceAccounts[0]"),
            ("{rules: [{from: [{serviceAccounts: ['shop/Api']}]}]}", "spec.rules[0].from[0].serviceAccounts[0]"),
            ("{rules: [{from: [{serviceAccounts: ['Shop/api']}]}]}", "spec.rules[0].from[0].serviceAccounts[0]"),
            ("{rules: [{from: [{namespaces: [shop, 'a.b']}]}]}", "spec.rules[0].from[0].namespaces[1]"),
            ("{rules: [{from: [{networks: ['10.0.0.0']}]}]}", "spec.rules[0].from[0].networks[0]"),
            ("{rules: [{from: [{networks: ['10.0.0.0/8', '10.1.2.3/16']}]}]}", "spec.rules[0].from[0].networks[1]"),
            ("{rules: [{from: [{networks: [{except: ['10.1.0.0/16']}]}]}]}", "spec.rules[0].from[0].networks[0].cidr"),
            ("{rules: [{from: [{networks: [{cidr: '10.0.0.0/33'}]}]}]}", "spec.rules[0].from[0].networks[0].cidr"),
            ("{rules: [{from: [{networks: [{cidr: '10.0.0.0/8', except: ['10.1.0.0/16', '11.0.0.0/16']}]}]}]}", "spec.rules[0].from[0].networks[0].except[1]"),
            ("{rules: [{from: [{networks: [{cidr: '10.0.0.0/8', except: ['fd00::/8']}]}]}]}", "spec.rules[0].from[0].networks[0].except[0]"),
            ("{rules: [{from: [{networks: [{cidr: '10.0.0.0/8', except: ['banana']}]}]}]}", "spec.rules[0].from[0].networks[0].except[0]"),
            ("{rules: [{from: [{networks: [{cidr: '10.0.0.0/8', exclude: []}]}]}]}", "spec.rules[0].from[0].networks[0].exclude"),
            ("{rules: [{to: [{}]}]}", "spec.rules[0].to[0]"),
            ("{rules: [{to: [{methods: ['GE T']}]}]}", "spec.rules[0].to[0].methods[0]"),
            ("{rules: [{to: [{paths: ['/ok', 'no-slash']}]}]}", "spec.rules[0].to[0].paths[1]"),
            ("{rules: [{to: [{paths: ['/api*']}]}]}", "spec.rules[0].to[0].paths[0]"),
            ("{rules: [{to: [{methods: [GET]}, {paths: ['regex:/(unclosed']}]}]}", "spec.rules[0].to[1].paths[0]"),
            ("{rules: [{to: [{paths: ['regex:\\w{1000}\\w{1000}']}]}]}", "spec.rules[0].to[0].paths[0]"),
            ("{rules: [{to: [{hosts: [a]}]}]}", "spec.rules[0].to[0].hosts"),
            ("{rules: [{}, {from: [{namespaces: [ok]}], to: [{ports: [1]}]}]}", "spec.rules[1].to[0].ports"),
            ("{priority: 1}", "spec.priority"),
        ];
        for (spec, field) in cases {
            let text = policy_yaml(spec);
            let parsed = parse_documents(&text).unwrap();
            assert!(parsed.objects.is_empty(), "{spec} was accepted");
            assert_eq!(parsed.problems.len(), 1, "{spec}");
            let problem = &parsed.problems[0];
            assert_eq!(
                problem.object.as_deref(),
                Some("AuthorizationPolicy shop/internal-api"),
                "{spec}"
            );
            assert!(
                problem
                    .message
                    .starts_with(&format!("document 1: {field}: ")),
                "{spec}: expected field {field}, got {}",
                problem.message
            );
        }
        let no_spec = parse_documents(
            "{apiVersion: policy.weft.io/v1alpha1, kind: AuthorizationPolicy, metadata: {name: p, namespace: shop}}",
        )
        .unwrap();
        assert!(no_spec.problems[0].message.contains("spec: is required"));
    }

    #[test]
    fn other_versions_of_the_kind_are_reported_not_ignored() {
        let parsed = parse_documents(
            "{apiVersion: policy.weft.io/v1, kind: AuthorizationPolicy, metadata: {name: p, namespace: shop}, spec: {}}",
        )
        .unwrap();
        assert!(parsed.objects.is_empty());
        assert_eq!(
            parsed.problems[0].object.as_deref(),
            Some("AuthorizationPolicy shop/p")
        );
        assert!(
            parsed.problems[0]
                .message
                .contains("apiVersion: policy.weft.io/v1 is not served"),
            "{}",
            parsed.problems[0].message
        );
    }

    #[test]
    fn invalid_regex_message_names_object_field_and_cause() {
        let parsed = parse_documents(&policy_yaml(
            "{rules: [{to: [{methods: [GET]}, {paths: ['regex:/(unclosed']}]}]}",
        ))
        .unwrap();
        let message = &parsed.problems[0].message;
        assert!(
            message.contains("spec.rules[0].to[1].paths[0]: invalid regex \"/(unclosed\""),
            "{message}"
        );
    }
}
