//! Watched objects decoded without what the caches never read. Decoding watch events is most of the operator's
//! CPU per run (the bench, `BENCHMARKS.md`), and `metadata.managedFields` (a JSON tree per field manager) and a
//! pod's or Job's `spec` are most of each event. Skipping them while decoding costs a scan of their bytes and no
//! allocation; trimming them after decoding (what `.modify` does) pays for building and dropping them.
//!
//! `Api<Slim<K>>` lists and watches exactly what `Api<K>` does; `Slim::into_inner` gives the `K` the caches hold.
//! A skipped field must be optional in `K` (it decodes as absent), so a required one fails the decode, loudly.

use std::borrow::Cow;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::runtime::watcher;
use serde::de::value::{BorrowedStrDeserializer, StringDeserializer};
use serde::de::{self, DeserializeOwned, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

/// Which top-level fields of a kind its cache never reads. `metadata.managedFields` is always skipped.
pub trait Skips {
    /// Nothing but `metadata.managedFields` unless a kind says more.
    const SKIPPED: &'static [&'static str] = &[];
}

/// A kind that a controller watches slim and keeps in a reflector store (what `watcher` and `reflector` ask of it).
pub trait Watched:
    Resource<DynamicType = ()> + Skips + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static
{
}

impl<K> Watched for K where
    K: Resource<DynamicType = ()> + Skips + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static
{
}

/// A `K` decoded without `K::SKIPPED` and `metadata.managedFields`.
#[derive(Clone, Debug)]
pub struct Slim<K>(K);

impl<K> Slim<K> {
    pub fn into_inner(self) -> K {
        self.0
    }
}

/// A watch's event about a `Slim<K>`, as the same event about the `K`.
pub fn unwrap_event<K>(event: watcher::Event<Slim<K>>) -> watcher::Event<K> {
    match event {
        watcher::Event::Apply(o) => watcher::Event::Apply(o.0),
        watcher::Event::Delete(o) => watcher::Event::Delete(o.0),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(o) => watcher::Event::InitApply(o.0),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

impl<'de, K: Skips + DeserializeOwned> de::Deserialize<'de> for Slim<K> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        K::deserialize(Skipping { inner: deserializer, level: Level::Object(K::SKIPPED) }).map(Slim)
    }
}

impl<K: Resource> Resource for Slim<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;

    fn kind(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn metadata_api() -> bool {
        K::metadata_api()
    }
    fn meta(&self) -> &ObjectMeta {
        self.0.meta()
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        self.0.meta_mut()
    }
}

/// Where in the object the decoder is: the object (skip its `SKIPPED`, descend into `metadata`) or its metadata
/// (skip `managedFields`).
#[derive(Clone, Copy)]
enum Level {
    Object(&'static [&'static str]),
    Metadata,
}

impl Level {
    fn skips(self, key: &str) -> bool {
        match self {
            Level::Object(skipped) => skipped.contains(&key),
            Level::Metadata => key == "managedFields",
        }
    }
}

/// A deserializer that hands the visitor a map which never yields the skipped keys.
struct Skipping<D> {
    inner: D,
    level: Level,
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Skipping<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.inner.deserialize_any(SkippingVisitor { inner: visitor, level: self.level })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.inner.deserialize_struct(name, fields, SkippingVisitor { inner: visitor, level: self.level })
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.inner.deserialize_map(SkippingVisitor { inner: visitor, level: self.level })
    }

    // k8s-openapi decodes `metadata` as an `Option`: the option must reach the visitor as one.
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Self::Error> {
        self.inner.deserialize_option(SkippingVisitor { inner: visitor, level: self.level })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf unit
        unit_struct newtype_struct seq tuple tuple_struct enum identifier ignored_any
    }
}

struct SkippingVisitor<V> {
    inner: V,
    level: Level,
}

impl<'de, V: Visitor<'de>> Visitor<'de> for SkippingVisitor<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.inner.visit_map(SkippingMap { inner: map, level: self.level, descend: false })
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        self.inner.visit_some(Skipping { inner: deserializer, level: self.level })
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.inner.visit_unit()
    }
}

/// The object's (or metadata's) map: skipped keys and their values are read past, never handed on.
struct SkippingMap<A> {
    inner: A,
    level: Level,
    /// The key just handed on is `metadata` at the object level: its value is decoded at the metadata level.
    descend: bool,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for SkippingMap<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Self::Error> {
        loop {
            let Some(key) = self.inner.next_key_seed(KeySeed)? else { return Ok(None) };
            if self.level.skips(&key) {
                self.inner.next_value::<IgnoredAny>()?;
                continue;
            }
            self.descend = matches!(self.level, Level::Object(_)) && key == "metadata";
            return match key {
                Cow::Borrowed(key) => seed.deserialize(BorrowedStrDeserializer::new(key)).map(Some),
                Cow::Owned(key) => seed.deserialize(StringDeserializer::new(key)).map(Some),
            };
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Self::Error> {
        if std::mem::take(&mut self.descend) {
            self.inner.next_value_seed(MetadataSeed(seed))
        } else {
            self.inner.next_value_seed(seed)
        }
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

/// A map key, borrowed from the input when it can be (serde_json borrows keys without escapes).
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// The value of `metadata`, decoded at the metadata level.
struct MetadataSeed<S>(S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for MetadataSeed<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        self.0.deserialize(Skipping { inner: deserializer, level: Level::Metadata })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A kind whose cache never reads its spec.
    #[derive(Clone, Debug, PartialEq, serde::Deserialize)]
    struct Thing {
        metadata: ObjectMeta,
        spec: Option<serde_json::Value>,
        status: Option<serde_json::Value>,
    }

    impl Skips for Thing {
        const SKIPPED: &'static [&'static str] = &["spec"];
    }

    /// A kind whose metadata is decoded as an `Option`, as k8s-openapi's kinds decode it.
    #[derive(Debug, serde::Deserialize)]
    struct OptionalMeta {
        metadata: Option<ObjectMeta>,
    }

    impl Skips for OptionalMeta {}

    /// A kind that needs its spec.
    #[derive(Debug, serde::Deserialize)]
    struct Needed {
        #[allow(dead_code)]
        spec: serde_json::Value,
    }

    impl Skips for Needed {
        const SKIPPED: &'static [&'static str] = &["spec"];
    }

    fn thing_json() -> serde_json::Value {
        json!({
            "apiVersion": "v1",
            "kind": "Thing",
            "metadata": {
                "name": "run-a-1-x",
                "namespace": "ns",
                "annotations": {"flowtel.dev/run": "run-a", "with\"escape": "v"},
                "managedFields": [{"manager": "kube-scheduler", "operation": "Update",
                                   "fieldsV1": {"f:status": {"f:conditions": {}}}}],
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "run-a-1", "uid": "u1",
                                     "controller": true}]
            },
            "spec": {"containers": [{"name": "main", "image": "busybox"}], "metadata": {"managedFields": []}},
            "status": {"phase": "Failed", "metadata": {"managedFields": [1]}}
        })
    }

    #[test]
    fn skips_managed_fields_and_the_named_fields_and_keeps_everything_else() {
        let text = thing_json().to_string();
        let slim = serde_json::from_str::<Slim<Thing>>(&text).unwrap().into_inner();
        let mut full: Thing = serde_json::from_str(&text).unwrap();
        assert!(full.metadata.managed_fields.is_some() && full.spec.is_some(), "the fixture has both");
        full.metadata.managed_fields = None;
        full.spec = None;
        assert_eq!(slim, full, "only the skipped fields differ; a nested `metadata` elsewhere is kept whole");
        assert_eq!(slim.metadata.annotations.unwrap()["with\"escape"], "v", "an escaped key is kept");
    }

    #[test]
    fn metadata_decoded_as_an_option_is_skipped_within_too() {
        let slim = serde_json::from_str::<Slim<OptionalMeta>>(&thing_json().to_string()).unwrap().into_inner();
        let metadata = slim.metadata.expect("metadata");
        assert_eq!((metadata.name.as_deref(), metadata.managed_fields), (Some("run-a-1-x"), None));
        let none = serde_json::from_str::<Slim<OptionalMeta>>(r#"{"metadata": null}"#).unwrap().into_inner();
        assert!(none.metadata.is_none());
    }

    #[test]
    fn a_watch_event_and_a_list_decode_through_it() {
        let event = json!({"type": "MODIFIED", "object": thing_json()}).to_string();
        let decoded: kube::core::WatchEvent<Slim<Thing>> = serde_json::from_str(&event).unwrap();
        let kube::core::WatchEvent::Modified(thing) = decoded else { panic!("a MODIFIED event") };
        assert_eq!(thing.into_inner().metadata.name.as_deref(), Some("run-a-1-x"));
        let list = json!({"metadata": {"resourceVersion": "7"}, "items": [thing_json(), thing_json()]}).to_string();
        let decoded: kube::core::ObjectList<Slim<Thing>> = serde_json::from_str(&list).unwrap();
        assert_eq!(decoded.items.len(), 2);
        assert!(decoded.items.iter().all(|t| t.0.spec.is_none() && t.0.metadata.managed_fields.is_none()));
    }

    #[test]
    fn a_metadata_only_kind_stays_metadata_only() {
        use k8s_openapi::api::core::v1::Secret;
        use kube::core::PartialObjectMeta;
        assert!(<Slim<PartialObjectMeta<Secret>> as Resource>::metadata_api());
        assert!(!<Slim<Secret> as Resource>::metadata_api());
    }

    #[test]
    fn malformed_input_and_a_skipped_required_field_are_errors() {
        assert!(serde_json::from_str::<Slim<Thing>>(r#"{"metadata": {"name": 3}}"#).is_err());
        let err = serde_json::from_str::<Slim<Needed>>(r#"{"spec": {}}"#).unwrap_err();
        assert!(err.to_string().contains("missing field `spec`"), "{err}");
    }
}
