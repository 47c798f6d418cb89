-- Argo CD health of a flowtel WorkflowRun, mapped the way Argo Workflows' own check maps a Workflow: Progressing while
-- it is pending, running or retrying, Healthy once it succeeded, Degraded once it failed (retries exhausted,
-- deadline, cancelled, or a permanent failure). It reads the kstatus conditions flowtel sets (Ready, Stalled,
-- Reconciling), so Argo CD, Flux and kpt agree.
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
local phase = obj.status.phase or "Pending"
if holds("Stalled") or phase == "Failed" then
  hs.status = "Degraded"
  hs.message = message_of("Stalled", message_of("Succeeded", "The run failed"))
elseif holds("Ready") or phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = message_of("Succeeded", "The run succeeded")
else
  hs.message = message_of("Reconciling", message_of("Succeeded", "The run is " .. phase))
end
return hs
