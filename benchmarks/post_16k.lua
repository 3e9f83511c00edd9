-- wrk script: POST a 16 KiB JSON body on every request, then report as wrk_report.lua does.

local script_dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(script_dir .. "wrk_report.lua")

local body_size = 16 * 1024
local prefix = '{"data":"'
local suffix = '"}'

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = prefix .. string.rep("x", body_size - #prefix - #suffix) .. suffix
