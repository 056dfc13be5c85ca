//! End-to-end tests: the real `meshid` binary in child processes, on loopback, checked with
//! parsers that are not ours (openssl, Python cryptography) where the output is a credential.

mod access;
mod audit_flood;
mod bad_input;
mod bundle_configmap;
mod check;
mod claims;
mod demo;
mod deploy;
mod fake_k8s;
mod faults;
mod inject;
mod iptables;
mod issuance;
mod k8s_manifests;
mod kubernetes;
mod lifecycle;
mod mesh;
mod operator_input;
mod pods;
mod policy_check;
mod protocols;
mod refusals;
mod replicas;
mod rotation;
mod secrets_help;
mod security;
mod support;
mod telemetry;
mod tokens;
mod transparent;
mod workload_api;
