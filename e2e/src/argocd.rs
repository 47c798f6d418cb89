//! Argo CD's health checks for flowtel's kinds, run as Argo CD runs them.

use crate::repo_root;

/// What Argo CD concludes about `object` with flowtel's health check for its kind
/// (`manifests/argocd/flowtel.dev/<Kind>/health.lua`): its (status, message), as Argo CD runs it (the object as the
/// global `obj`, the script's returned table).
pub fn argocd_health(object: &serde_json::Value) -> Result<(String, String), String> {
    use mlua::LuaSerdeExt;
    let kind = object["kind"].as_str().ok_or("the object has no kind")?;
    let path = repo_root().join(format!("manifests/argocd/flowtel.dev/{kind}/health.lua"));
    let script = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let lua = mlua::Lua::new();
    let obj = lua.to_value(object).map_err(|e| e.to_string())?;
    lua.globals().set("obj", obj).map_err(|e| e.to_string())?;
    let hs: mlua::Table = lua.load(&script).set_name(path.display().to_string()).eval().map_err(|e| e.to_string())?;
    let status: String = hs.get("status").map_err(|e| format!("status: {e}"))?;
    let message: String = hs.get("message").map_err(|e| format!("message: {e}"))?;
    Ok((status, message))
}
