"""Host-side plots and animations from evaluation traces."""
