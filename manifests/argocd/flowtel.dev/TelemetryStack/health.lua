-- Argo CD health of a flowtel TelemetryStack: Healthy when every component serves (Ready), Degraded when flowtel
-- refused or could not apply it (Degraded or Stalled, with the field or object named in the message), Progressing
-- while it rolls out. The same conditions give kstatus (Flux, kpt) the same answer.
local hs = {status = "Progressing", message = "Waiting for the flowtel operator"}
if obj.status == nil then
  return hs
end
local generation = obj.metadata ~= nil and obj.metadata.generation or nil
local observed = obj.status.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  hs.message = "Waiting for the flowtel operator to observe generation " .. generation
  return hs
end
local conditions = {}
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    conditions[c.type] = c
  end
end
local function holds(name)
  return conditions[name] ~= nil and conditions[name].status == "True"
end
local function message_of(name, default)
  local c = conditions[name]
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return default
end
if holds("Degraded") or holds("Stalled") then
  hs.status = "Degraded"
  hs.message = message_of("Degraded", message_of("Stalled", "The stack is degraded"))
elseif holds("Ready") then
  hs.status = "Healthy"
  hs.message = message_of("Ready", "Every component is ready")
else
  hs.message = message_of("Progressing", message_of("Reconciling", "The stack is rolling out"))
end
return hs
